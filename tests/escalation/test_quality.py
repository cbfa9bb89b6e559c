"""The core on the labelled photos (tests/data/quality): right, or honestly unknown.

These run the real models on real photos none of the other tests tune on. Each assertion is
about what a person would say: horses are never "cattle", a painting is ``unknown`` or named
correctly, a landscape is not turned into objects. ``bench/quality.py`` gives the figures.
"""

from __future__ import annotations

import functools
import hashlib
import json

import pytest

from gateway import CoreEscalationSettings
from gateway._core._calibrate import Labelled, Tally, judge, load_labelled
from gateway._core._escalate import CoreAnswer, CoreModels
from gateway._core._identify import FEATURES, Calibration, Candidate, candidates
from gateway._core._taxonomy import taxonomy
from gateway._inference._image import decode_image
from tests.conftest import ROOT

from .conftest import MODELS

QUALITY = ROOT / "tests" / "data" / "quality"


@functools.cache
def photos() -> dict[str, Labelled]:
    return {p.name: p for p in load_labelled(QUALITY)}


@functools.cache
def models() -> CoreModels:
    return CoreModels(CoreEscalationSettings(models_dir=MODELS, providers="cpu"))


@functools.cache
def whole_frame(name: str) -> CoreAnswer:
    frame = decode_image(photos()[name].path.read_bytes(), max_pixels=40_000_000)
    return models().identify_sync(frame, is_full_frame=True)


def verdicts(name: str) -> list[tuple[str, str]]:
    answer = whole_frame(name)
    return [(o.concept, judge(o.concept, o.box, photos()[name])[0]) for o in answer.objects]


def test_the_set_is_what_its_provenance_says() -> None:
    provenance = json.loads((QUALITY / "provenance.json").read_text())["photos"]
    labels = json.loads((QUALITY / "labels.json").read_text())["photos"]
    assert len(labels) >= 40
    assert set(provenance) == set(labels)
    for name, entry in provenance.items():
        data = (QUALITY / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert all(entry[key] for key in ("licence", "package", "version", "path")), name
    # None of them is a photo other tests tune on.
    tuned = {p.read_bytes() for p in (ROOT / "tests" / "data" / "photos").glob("*.jpg")}
    assert not tuned & {(QUALITY / e["file"]).read_bytes() for e in provenance.values()}
    # Every label is a concept of the taxonomy, spelled canonically.
    tax = taxonomy()
    for name, objects in labels.items():
        for concept, box in objects:
            assert tax.known(concept), (name, concept)
            assert tax.canonical(concept) == concept, (name, concept)
            assert 0 <= box[0] < box[2] <= 1, (name, box)
            assert 0 <= box[1] < box[3] <= 1, (name, box)


def test_horses_are_never_answered_cattle() -> None:
    tax = taxonomy()
    answer = whole_frame("horses")
    assert not tax.is_a(taxonomy().canonical(answer.label), "cattle")
    assert not [o for o in answer.objects if tax.is_a(o.concept, "cattle")]
    # Either it says horse (or something a horse is, e.g. animal), or it does not know.
    assert all(tax.is_a("horse", o.concept) for o in answer.objects), answer.objects


@pytest.mark.parametrize("name", ["scream_painting", "starry_night_painting"])
def test_a_painting_is_unknown_or_named_correctly(name: str) -> None:
    answer = whole_frame(name)
    assert "wrong" not in dict(verdicts(name)).values(), verdicts(name)
    if answer.still_unknown:
        assert (answer.label, answer.objects) == ("unknown", ())


@pytest.mark.parametrize("name", ["aerial_city", "tree_field", "dahlia"])
def test_no_confident_wrong_answer_where_the_models_have_no_name(name: str) -> None:
    # Nothing in these has a class of its own in the models' vocabularies (a city from the
    # air, a tree, a dahlia): the classifier's nearest guesses ("honeycomb") must not pass.
    assert "wrong" not in dict(verdicts(name)).values(), verdicts(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("portrait_man", "Person"),
        ("three_puppies", "Dog"),
        ("robin", "bird"),
        ("mandrill", "monkey"),
        ("airplane_field", "airplane"),
        ("car_rear", "Car"),
    ],
)
def test_what_the_models_know_is_named(name: str, expected: str) -> None:
    answer = whole_frame(name)
    assert (answer.label, answer.still_unknown) == (expected, False)
    assert dict(verdicts(name))[taxonomy().canonical(expected)] == "correct"


def test_several_objects_in_one_frame_are_all_answered() -> None:
    # Three puppies side by side: one whole-frame escalation answers three dogs, each on
    # its own box (not one "dog" for the frame).
    answer = whole_frame("three_puppies")
    assert [
        (o.concept, v) for o, (_, v) in zip(answer.objects, verdicts("three_puppies"), strict=True)
    ] == [("dog", "correct")] * 3
    centres = sorted((o.box.x_min + o.box.x_max) / 2 for o in answer.objects)
    assert centres[1] - centres[0] > 0.1
    assert centres[2] - centres[1] > 0.1


def test_a_giraffe_beside_a_zebra_are_both_named() -> None:
    # One whole frame, two animals: the zebra (both models agree) and the giraffe (no
    # ImageNet class; NanoDet alone, which the classifier's silence does not count against).
    assert sorted(verdicts("giraffe_zebra")) == [("giraffe", "correct"), ("zebra", "correct")]


@pytest.mark.slow
def test_over_the_whole_set_few_answers_are_confidently_wrong() -> None:
    tally = Tally()
    for name, photo in photos().items():
        answer = whole_frame(name)
        answers = [(o.concept, o.box, o.probability) for o in answer.objects]
        tally.add_photo(photo, answers, int(answer.still_unknown))
    report = tally.report()
    assert report["confident_wrong_rate"] <= 0.05, report
    # A floor well under what the committed calibration reaches on whole frames, so the
    # test fails when the combination breaks, not when the fit moves a little.
    assert report["recall"] >= 0.25, report


def test_the_committed_calibration_says_how_it_was_fit_and_is_not_a_guess() -> None:
    calibration = Calibration.load()
    assert len(calibration.weights) == len(FEATURES)
    assert 0.5 <= calibration.threshold < 1.0
    loo = calibration.fit["leave_one_out"]
    assert isinstance(loo, dict)
    assert loo["confident_wrong_rate"] <= 0.05
    assert calibration.fit["photos"] == len(photos())


@functools.cache
def whole_frame_candidates(name: str) -> dict[str, Candidate]:
    """The candidates of a whole-frame escalation, per concept (the largest box of each)."""
    frame = decode_image(photos()[name].path.read_bytes(), max_pixels=40_000_000)
    found: dict[str, Candidate] = {}
    for c in sorted(candidates(models().observe_sync(frame)), key=lambda c: c.box.area):
        found[c.concept] = c
    return found


def test_a_concept_carries_its_strongest_single_class_and_whether_it_tops_the_frame() -> None:
    # The Alps: one class ("alp") carries almost all of the mountain's mass, and mountain is
    # the strongest concept of the frame; "landscape" (valley, cliff...) is neither.
    found = whole_frame_candidates("mountain_view")
    mountain = found["mountain"]
    assert mountain.frame_top
    assert 0.5 < mountain.frame_peak <= mountain.frame_mass
    assert mountain.frame_mass - mountain.frame_peak < 0.1
    assert not found["landscape"].frame_top
    assert found["landscape"].frame_peak < 0.1


def test_insect_mass_spread_over_many_classes_has_a_low_peak() -> None:
    # Heather full of blossom: the classifier spreads "insect" over cabbage butterfly, bee,
    # monarch... -- the mass is high, no single class is: the peak tells the two apart.
    insect = whole_frame_candidates("heather")["insect"]
    assert insect.frame_mass > 0.5
    assert insect.frame_peak < 0.6 * insect.frame_mass
    assert insect.crop_peak < 0.6 * insect.crop_mass


@pytest.mark.parametrize("name", ["heather", "butterfly_leaf"])
def test_invertebrate_is_too_general_to_be_proposed(name: str) -> None:
    # "invertebrate" collects jellyfish, snails, crabs and every insect: never an answer
    # (like "mammal"), though "insect" and "butterfly" below it are.
    assert "invertebrate" not in whole_frame_candidates(name)
