"""One taxonomy over OID-24, COCO-80 and ImageNet-1k: every label placed, no sibling swaps."""

from __future__ import annotations

import functools

import pytest

from gateway._core._taxonomy import COCO80, IMAGENET1K, OID24, ROOT, Taxonomy, taxonomy
from gateway._inference._manifest import load_manifest

from .conftest import MODELS

VOCABULARIES = {
    OID24: "edge_ssd_mobilenetv2_oid24",
    COCO80: "core_nanodet_coco80",
    IMAGENET1K: "core_efficientnet_lite2",
}


@functools.cache
def labels(vocabulary: str) -> tuple[str, ...]:
    return load_manifest(MODELS).entry(VOCABULARIES[vocabulary]).labels


def concepts(vocabulary: str) -> tuple[str | None, ...]:
    return taxonomy().vocabulary(vocabulary, labels(vocabulary))


def named(vocabulary: str, label: str) -> str | None:
    return concepts(vocabulary)[labels(vocabulary).index(label)]


@pytest.mark.parametrize("vocabulary", [OID24, COCO80, IMAGENET1K])
def test_every_label_of_every_model_maps_to_a_concept_under_the_root(vocabulary: str) -> None:
    tax = taxonomy()
    mapped = concepts(vocabulary)
    assert len(mapped) == len(labels(vocabulary))
    for label, concept in zip(labels(vocabulary), mapped, strict=True):
        if label == "???":  # the SSD's background class
            assert concept is None
            continue
        assert concept, label
        chain = tax.ancestors(concept)
        assert chain[-1] == ROOT, (label, chain)
        assert len(chain) >= 2, (label, chain)


def test_horses_are_never_cattle() -> None:
    tax = taxonomy()
    assert named(IMAGENET1K, "sorrel") == "horse"
    assert named(COCO80, "horse") == "horse"
    assert not tax.related("horse", "cattle")
    assert tax.is_a("horse", "animal")
    # Exactly these labels land on cattle, in every vocabulary.
    cattle = {
        (v, label)
        for v in VOCABULARIES
        for label, concept in zip(labels(v), concepts(v), strict=True)
        if concept is not None and tax.is_a(concept, "cattle")
    }
    assert cattle == {(OID24, "Cattle"), (COCO80, "cow"), (IMAGENET1K, "ox")}


def test_dog_breeds_are_dogs_and_wolves_are_not() -> None:
    tax = taxonomy()
    for breed in ("Chihuahua", "golden retriever", "malamute", "Mexican hairless", "Cardigan"):
        assert named(IMAGENET1K, breed) == "dog", breed
    assert tax.ancestors("dog")[:2] == ("dog", "canine")
    assert tax.is_a("dog", "animal")
    for wild in ("timber wolf", "coyote", "red fox", "hyena"):
        concept = named(IMAGENET1K, wild)
        assert concept is not None
        assert not tax.is_a(concept, "dog"), wild
    # The sweater "cardigan" is clothing, evidence of a person, not a corgi.
    index = labels(IMAGENET1K).index("cardigan")
    assert concepts(IMAGENET1K)[index] == "clothing"
    assert taxonomy().implied(IMAGENET1K, labels(IMAGENET1K))[index] == "person"


def test_colliding_names_are_mapped_by_model_and_index() -> None:
    tax = taxonomy()
    # ImageNet's "kite" (index 21) is a bird of prey; COCO's is the toy.
    assert concepts(IMAGENET1K)[21] == "bird"
    assert named(COCO80, "kite") == "kite"
    assert tax.is_a("kite", "toy")
    assert not tax.related("kite", "bird")
    # ImageNet's "crane" is the machine; the bird is "crane bird".
    assert named(IMAGENET1K, "crane") == "crane"
    assert not tax.is_a("crane", "animal")
    assert named(IMAGENET1K, "crane bird") == "bird"
    # ImageNet's and COCO's "mouse" are computer mice.
    assert named(IMAGENET1K, "mouse") == named(COCO80, "mouse") == "computer mouse"


def test_synonyms_and_parents() -> None:
    tax = taxonomy()
    assert tax.canonical("Sofa") == tax.canonical("couch") == "couch"
    assert tax.canonical("tv") == "television"
    assert tax.canonical("Cow") == "cattle"
    assert tax.is_a("mug", "cup")
    assert not tax.is_a("cup", "mug")
    assert tax.related("cup", "mug")
    assert tax.is_a("butterfly", "insect")
    assert tax.is_a("squirrel", "rodent")
    assert tax.edge_name("dog") == "Dog"
    assert tax.edge_name("coffee cup") == "Coffee cup"
    assert tax.edge_name("zebra") == "zebra"
    # The edge's and the core's names of one thing meet in one concept.
    assert named(OID24, "Coffee cup") == "coffee cup"
    assert tax.is_a(named(IMAGENET1K, "espresso") or "", "cup")
    assert named(OID24, "Computer monitor") == named(IMAGENET1K, "monitor")


def test_a_reordered_imagenet_list_is_not_trusted_by_index() -> None:
    shuffled = list(labels(IMAGENET1K))
    shuffled[151], shuffled[300] = shuffled[300], shuffled[151]
    mapped = Taxonomy().vocabulary(IMAGENET1K, shuffled)
    # Without the anchors, no index range applies: a breed keeps its own name.
    assert mapped[152] == "japanese spaniel"


def test_unknown_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown vocabulary"):
        Taxonomy().vocabulary("yolo9000", ["thing"])
