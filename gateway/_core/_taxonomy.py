"""One taxonomy over the vocabularies of the edge and core models.

The edge detector speaks 24 Open Images classes ("Cattle", "Coffee cup"), the core detector
the 80 COCO classes ("cow", "cup"), the core classifier the 1000 ImageNet classes (118 dog
breeds, "sorrel" for a horse, "kite" for a bird of prey, "crane" for a machine). Every label
of the three maps to exactly one *concept* (lower case, "dog", "horse", "kite"); concepts
form a tree under ``entity`` with synonyms ("sofa" for "couch", "tv" for "television") so
that answers of different models can be compared, summed and checked against what a person
named:

- ``is_a("golden retriever", "dog")``, ``is_a("dog", "animal")``: a more specific answer
  names the same thing; a more general one ("animal" for a horse) is true but names less.
- Mappings are by *model and index*, never by bare name, because the vocabularies collide:
  ImageNet's "kite" (index 21) is a bird and COCO's "kite" a toy; ImageNet's "crane" (517) a
  machine and "crane bird" (134) a bird; ImageNet's "mouse" a computer mouse.
- Nothing is mapped to a sibling: "horse" and "cattle" are different children of
  ``ungulate``, so no table can turn one into the other (the tests check every label).
- Some classifier classes are evidence for another concept rather than an answer of their
  own: a "sweatshirt" or "jersey" filling a crop means a person is there (:meth:`implied`);
  "tile roof" means a building. The core never answers "sweatshirt".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

__all__ = ["COCO80", "IMAGENET1K", "OID24", "ROOT", "Taxonomy", "taxonomy"]

ROOT = "entity"
OID24 = "oid24"
COCO80 = "coco80"
IMAGENET1K = "imagenet1k"

# ---------------------------------------------------------------------------- the tree
# concept: parent. Concepts not listed here but produced by a mapping hang under "object".
_PARENTS: dict[str, str] = {
    "animal": ROOT,
    "object": ROOT,
    "scene": ROOT,
    "plant": ROOT,
    "food": ROOT,
    "person": ROOT,
    "sandwich": "food",
    "hot dog": "food",
    "pizza": "food",
    "donut": "food",
    "cake": "food",
    "broccoli": "vegetable",
    "carrot": "vegetable",
    "bench": "furniture",
    "toilet": "furniture",
    "sink": "furniture",
    "fork": "kitchenware",
    "knife": "kitchenware",
    "spoon": "kitchenware",
    "microwave": "kitchenware",
    "oven": "kitchenware",
    "toaster": "kitchenware",
    "refrigerator": "kitchenware",
    "frisbee": "sports equipment",
    "skis": "sports equipment",
    "snowboard": "sports equipment",
    "baseball bat": "sports equipment",
    "baseball glove": "sports equipment",
    "skateboard": "sports equipment",
    "surfboard": "sports equipment",
    "tennis racket": "sports equipment",
    "tie": "clothing",
    "mammal": "animal",
    "bird": "animal",
    "fish": "animal",
    "reptile": "animal",
    "amphibian": "animal",
    "invertebrate": "animal",
    "insect": "invertebrate",
    "arthropod": "invertebrate",
    "butterfly": "insect",
    "carnivore": "mammal",
    "canine": "carnivore",
    "dog": "canine",
    "wild canine": "canine",
    "feline": "carnivore",
    "cat": "feline",
    "big cat": "feline",
    "bear": "carnivore",
    "small carnivore": "carnivore",
    "ungulate": "mammal",
    "horse": "ungulate",
    "zebra": "ungulate",
    "giraffe": "ungulate",
    "bovine": "ungulate",
    "cattle": "bovine",
    "sheep": "ungulate",
    "goat": "ungulate",
    "antelope": "ungulate",
    "camel": "ungulate",
    "llama": "ungulate",
    "pig": "ungulate",
    "hippopotamus": "ungulate",
    "elephant": "mammal",
    "primate": "mammal",
    "monkey": "primate",
    "ape": "primate",
    "rodent": "mammal",
    "squirrel": "rodent",
    "rabbit": "mammal",
    "marsupial": "mammal",
    "marine mammal": "mammal",
    "panda": "mammal",
    "vehicle": "object",
    "car": "vehicle",
    "truck": "vehicle",
    "bus": "vehicle",
    "train": "vehicle",
    "motorcycle": "vehicle",
    "bicycle": "vehicle",
    "stationary bicycle": "object",
    "airplane": "vehicle",
    "boat": "vehicle",
    "building": "object",
    "house": "building",
    "bridge": "object",
    "furniture": "object",
    "chair": "furniture",
    "couch": "furniture",
    "bed": "furniture",
    "table": "furniture",
    "desk": "table",
    "electronics": "object",
    "screen": "electronics",
    "television": "screen",
    "computer monitor": "screen",
    "laptop": "electronics",
    "computer mouse": "electronics",
    "keyboard": "electronics",
    "phone": "electronics",
    "remote control": "electronics",
    "camera": "electronics",
    "container": "object",
    "bottle": "container",
    "cup": "container",
    "mug": "cup",
    "coffee cup": "cup",
    "bowl": "container",
    "vase": "container",
    "box": "container",
    "bag": "container",
    "clothing": "object",
    "footwear": "clothing",
    "boot": "footwear",
    "high heels": "footwear",
    "fruit": "food",
    "apple": "fruit",
    "citrus": "fruit",
    "orange": "citrus",
    "lemon": "citrus",
    "lime": "citrus",
    "banana": "fruit",
    "kiwi": "fruit",
    "vegetable": "food",
    "flower": "plant",
    "tree": "plant",
    "potted plant": "plant",
    "fungus": "plant",
    "mountain": "scene",
    "beach": "scene",
    "landscape": "scene",
    "painting": "object",
    "toy": "object",
    "kite": "toy",
    "teddy bear": "toy",
    "sports ball": "object",
    "sports equipment": "object",
    "book": "object",
    "pen": "object",
    "tripod": "object",
    "lighter": "object",
    "coin": "object",
    "clock": "object",
    "umbrella": "object",
    "kitchenware": "object",
}

_SYNONYMS: dict[str, str] = {
    "people": "person",
    "man": "person",
    "woman": "person",
    "human": "person",
    "sofa": "couch",
    "tv": "television",
    "monitor": "computer monitor",
    "mouse": "computer mouse",
    "cell phone": "phone",
    "mobile phone": "phone",
    "cow": "cattle",
    "ox": "cattle",
    "puppy": "dog",
    "kitten": "cat",
    "plane": "airplane",
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "bike": "bicycle",
    "dining table": "table",
    "shoe": "footwear",
    "notebook": "book",
    "ball": "sports ball",
    "picture": "painting",
    "drawing": "painting",
    "remote": "remote control",
}


# ----------------------------------------------------------------------- vocabularies
def _each(names: str, concept: str) -> dict[str, str]:
    """``{name: concept}`` for each of the comma-separated ``names``."""
    return dict.fromkeys((n.strip() for n in names.split(",")), concept)


_OID24: dict[str, str | None] = {
    "???": None,  # the SSD's background class
    "Bicycle": "bicycle",
    "Boot": "boot",
    "Laptop": "laptop",
    "Person": "person",
    "Chair": "chair",
    "Cattle": "cattle",
    "Desk": "desk",
    "Cat": "cat",
    "Computer mouse": "computer mouse",
    "Computer monitor": "computer monitor",
    "Box": "box",
    "Mug": "mug",
    "Coffee cup": "coffee cup",
    "Stationary bicycle": "stationary bicycle",
    "Table": "table",
    "Bottle": "bottle",
    "High heels": "high heels",
    "Vehicle": "vehicle",
    "Footwear": "footwear",
    "Dog": "dog",
    "Book": "book",
    "Camera": "camera",
    "Car": "car",
}

# COCO names that are not already concepts or synonyms of one.
_COCO80: dict[str, str] = {
    "stop sign": "street sign",
    "cow": "cattle",
    "backpack": "bag",
    "handbag": "bag",
    "suitcase": "bag",
    "wine glass": "cup",
    "tv": "television",
    "mouse": "computer mouse",
    "remote": "remote control",
    "cell phone": "phone",
    "dining table": "table",
}

# ImageNet-1k: class-index ranges of animals (the list's order is fixed since 2012).
_IMAGENET_RANGES: tuple[tuple[int, int, str], ...] = (
    (0, 6, "fish"),
    (7, 24, "bird"),
    (25, 32, "amphibian"),
    (33, 68, "reptile"),
    (69, 79, "arthropod"),
    (80, 100, "bird"),
    (101, 101, "elephant"),
    (102, 103, "mammal"),
    (104, 106, "marsupial"),
    (107, 126, "invertebrate"),
    (127, 146, "bird"),
    (147, 150, "marine mammal"),
    (151, 268, "dog"),
    (269, 280, "wild canine"),
    (281, 285, "cat"),
    (286, 293, "big cat"),
    (294, 297, "bear"),
    (298, 299, "small carnivore"),
    (300, 320, "insect"),
    (321, 326, "butterfly"),
    (327, 329, "invertebrate"),
    (330, 332, "rabbit"),
    (333, 334, "rodent"),
    (335, 335, "squirrel"),
    (336, 338, "rodent"),
    (339, 339, "horse"),
    (340, 340, "zebra"),
    (341, 343, "pig"),
    (344, 344, "hippopotamus"),
    (345, 345, "cattle"),
    (346, 347, "bovine"),
    (348, 349, "sheep"),
    (350, 350, "goat"),
    (351, 353, "antelope"),
    (354, 354, "camel"),
    (355, 355, "llama"),
    (356, 362, "small carnivore"),
    (363, 364, "mammal"),
    (365, 369, "ape"),
    (370, 384, "monkey"),
    (385, 386, "elephant"),
    (387, 388, "panda"),
    (389, 397, "fish"),
)
# Anchors checked before the ranges are trusted: a list in another order maps by name only.
_IMAGENET_ANCHORS = {0: "tench", 151: "Chihuahua", 268: "Mexican hairless", 339: "sorrel"}

# ImageNet objects, food and scenes (from index 398 on) by name.
_IMAGENET_NAMES: dict[str, str] = {
    **_each("airliner, warplane, airship, space shuttle", "airplane"),
    **_each(
        "beach wagon, cab, convertible, jeep, limousine, minivan, Model T, racer, "
        "sports car, police van, ambulance, go-kart, golfcart",
        "car",
    ),
    **_each(
        "pickup, moving van, tow truck, trailer truck, garbage truck, fire engine, "
        "forklift, tractor, half track",
        "truck",
    ),
    **_each("minibus, school bus, trolleybus, recreational vehicle", "bus"),
    **_each(
        "bullet train, electric locomotive, steam locomotive, freight car, "
        "passenger car, streetcar",
        "train",
    ),
    **_each("moped, motor scooter", "motorcycle"),
    **_each("mountain bike, bicycle-built-for-two, tricycle, unicycle", "bicycle"),
    **_each(
        "canoe, catamaran, container ship, fireboat, gondola, lifeboat, liner, schooner, "
        "speedboat, trimaran, yawl, aircraft carrier, submarine, paddlewheel, wreck",
        "boat",
    ),
    **_each(
        "palace, monastery, church, mosque, stupa, castle, library, cinema, prison, "
        "greenhouse, planetarium, bakery, barbershop, bookshop, butcher shop, "
        "confectionery, grocery store, shoe shop, tobacco shop, toyshop, restaurant, "
        "apiary, water tower, beacon, cliff dwelling, bell cote, lumbermill",
        "building",
    ),
    **_each("boathouse, barn, mobile home, yurt", "house"),
    **_each("steel arch bridge, suspension bridge, viaduct", "bridge"),
    **_each("folding chair, rocking chair, barber chair, throne", "chair"),
    "studio couch": "couch",
    **_each("four-poster, crib, cradle, bassinet", "bed"),
    "dining table": "table",
    "desk": "desk",
    "broccoli": "broccoli",
    "hotdog": "hot dog",
    "park bench": "bench",
    **_each(
        "bookcase, china cabinet, chiffonier, wardrobe, entertainment center, medicine chest",
        "furniture",
    ),
    **_each("television, home theater", "television"),
    **_each("monitor, screen, desktop computer", "computer monitor"),
    **_each("laptop, notebook, hand-held computer", "laptop"),
    "mouse": "computer mouse",
    **_each("computer keyboard, typewriter keyboard, space bar", "keyboard"),
    **_each("cellular telephone, dial telephone, pay-phone", "phone"),
    "remote control": "remote control",
    **_each("reflex camera, Polaroid camera", "camera"),
    **_each(
        "water bottle, wine bottle, beer bottle, pop bottle, pill bottle, whiskey jug", "bottle"
    ),
    "coffee mug": "mug",
    **_each("cup, espresso, beer glass, goblet, measuring cup", "cup"),
    **_each("soup bowl, mixing bowl", "bowl"),
    "vase": "vase",
    "pot": "potted plant",
    **_each("carton, crate, chest, packet, pencil box", "box"),
    **_each("backpack, mailbag, plastic bag, purse, shopping basket", "bag"),
    **_each("running shoe, sandal, clog, Loafer, sock, Christmas stocking", "footwear"),
    "cowboy boot": "boot",
    **_each("Granny Smith", "apple"),
    "orange": "orange",
    "lemon": "lemon",
    **_each("banana, strawberry, fig, pineapple, jackfruit, custard apple, pomegranate", "fruit"),
    **_each(
        "head cabbage, cauliflower, zucchini, spaghetti squash, acorn squash, "
        "butternut squash, cucumber, artichoke, bell pepper, cardoon, corn",
        "vegetable",
    ),
    **_each(
        "mushroom, coral fungus, agaric, gyromitra, stinkhorn, earthstar, hen-of-the-woods, bolete",
        "fungus",
    ),
    **_each("daisy, yellow lady's slipper, rapeseed", "flower"),
    **_each("alp, volcano", "mountain"),
    **_each("seashore, sandbar, lakeside", "beach"),
    **_each("cliff, valley, promontory, geyser, coral reef", "landscape"),
    **_each("ballplayer, groom, scuba diver", "person"),
    **_each("teddy, piggy bank, pinwheel, jigsaw puzzle", "toy"),
    **_each(
        "soccer ball, tennis ball, golf ball, basketball, volleyball, rugby ball, "
        "ping-pong ball, baseball, croquet ball, punching bag",
        "sports ball",
    ),
    **_each("book jacket, comic book, binder, menu", "book"),
    **_each("ballpoint, fountain pen, quill", "pen"),
    "tripod": "tripod",
    "lighter": "lighter",
    **_each("analog clock, digital clock, wall clock", "clock"),
    "umbrella": "umbrella",
    "parachute": "kite",
}

# ImageNet classes that are evidence of another concept rather than an answer: clothing
# fills a crop of a person; roofs and domes are parts of buildings; car parts of cars.
_IMPLIES: dict[str, str] = {
    **_each(
        "abaya, academic gown, apron, bearskin, bikini, bolo tie, bonnet, bow tie, "
        "brassiere, bulletproof vest, cardigan, cloak, cowboy hat, feather boa, "
        "fur coat, gown, hoopskirt, jean, jersey, kimono, lab coat, maillot, "
        "maillot tank suit, military uniform, miniskirt, mortarboard, overskirt, pajama, "
        "poncho, sarong, ski mask, sombrero, stole, suit, sweatshirt, swimming trunks, "
        "trench coat, vestment, wig, Windsor tie, neck brace, sunglass, sunglasses",
        "person",
    ),
    **_each("tile roof, thatch, dome, patio, sliding door, shoji", "building"),
    **_each("car wheel, car mirror, grille, disk brake, seat belt", "car"),
    "wing": "airplane",
    "horse cart": "horse",
    "oxcart": "cattle",
}


@dataclass(frozen=True, slots=True)
class _Vocab:
    concepts: tuple[str | None, ...]
    implied: tuple[str | None, ...]


class Taxonomy:
    """Concepts, their parents and synonyms, and each model vocabulary mapped onto them."""

    def __init__(self) -> None:
        self._parents: dict[str, str] = dict(_PARENTS)
        self._vocabs: dict[str, _Vocab] = {}

    # ----------------------------------------------------------------- concepts
    def canonical(self, name: str) -> str:
        """The concept ``name`` stands for (synonyms and case folded); unknown names as is."""
        low = name.strip().lower()
        return _SYNONYMS.get(low, low)

    def known(self, name: str) -> bool:
        """Whether ``name`` (or its synonym) is a concept of the tree."""
        concept = self.canonical(name)
        return concept == ROOT or concept in self._parents

    def parent(self, concept: str) -> str | None:
        """The parent concept (``None`` for the root); concepts not in the tree: ``object``."""
        concept = self.canonical(concept)
        if concept == ROOT:
            return None
        return self._parents.get(concept, "object")

    def ancestors(self, concept: str) -> tuple[str, ...]:
        """``concept`` and its ancestors up to the root, nearest first."""
        chain = [self.canonical(concept)]
        while (up := self.parent(chain[-1])) is not None:
            chain.append(up)
        return tuple(chain)

    def is_a(self, concept: str, other: str) -> bool:
        """Whether ``concept`` is ``other`` or a kind of it (``is_a("dog", "animal")``)."""
        return self.canonical(other) in self.ancestors(concept)

    def related(self, a: str, b: str) -> bool:
        """Whether one of ``a``, ``b`` is a kind of the other (neither is a wrong answer)."""
        return self.is_a(a, b) or self.is_a(b, a)

    # ----------------------------------------------------------------- vocabularies
    def vocabulary(self, name: str, labels: Sequence[str]) -> tuple[str | None, ...]:
        """The concept of each label of model vocabulary ``name``, by index (cached)."""
        return self._vocab(name, tuple(labels)).concepts

    def implied(self, name: str, labels: Sequence[str]) -> tuple[str | None, ...]:
        """Per label: the concept it is evidence of instead of an answer (or ``None``)."""
        return self._vocab(name, tuple(labels)).implied

    def concept_of(self, vocabulary: str, labels: Sequence[str], index: int) -> str | None:
        """The concept of label ``index`` of ``vocabulary``."""
        return self.vocabulary(vocabulary, labels)[index]

    def _vocab(self, name: str, labels: tuple[str, ...]) -> _Vocab:
        key = f"{name}:{hash(labels)}"
        found = self._vocabs.get(key)
        if found is None:
            found = _build(name, labels)
            self._vocabs[key] = found
        return found

    def edge_name(self, concept: str) -> str:
        """The edge model's (OID-24) spelling of ``concept`` where it has one ("Dog")."""
        concept = self.canonical(concept)
        for label, mapped in _OID24.items():
            if mapped == concept:
                return label
        return concept

    def concepts(self) -> Iterable[str]:
        """Every concept of the tree (without those only mappings create)."""
        return (ROOT, *self._parents)


def _build(name: str, labels: tuple[str, ...]) -> _Vocab:
    concepts: list[str | None] = []
    implied: list[str | None] = [None] * len(labels)
    if name == OID24:
        concepts = [_OID24.get(label, label.lower()) for label in labels]
    elif name == COCO80:
        concepts = [_COCO80.get(label, _SYNONYMS.get(label, label)) for label in labels]
    elif name == IMAGENET1K:
        concepts = [_IMAGENET_NAMES.get(label, label.lower()) for label in labels]
        ordered = len(labels) == 1000 and all(
            labels[i] == label for i, label in _IMAGENET_ANCHORS.items()
        )
        if ordered:
            for low, high, concept in _IMAGENET_RANGES:
                for i in range(low, high + 1):
                    concepts[i] = concept
        for i, label in enumerate(labels):
            if (ordered and i < 398) or label not in _IMPLIES:
                continue
            implied[i] = _IMPLIES[label]
            concepts[i] = "clothing" if _IMPLIES[label] == "person" else label.lower()
    else:
        raise ValueError(f"unknown vocabulary {name!r}")
    return _Vocab(tuple(concepts), tuple(implied))


@cache
def taxonomy() -> Taxonomy:
    """The process-wide taxonomy."""
    return Taxonomy()
