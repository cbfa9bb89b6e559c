"""What the core's models say about one escalated image, combined and calibrated.

The core has a detector (NanoDet, COCO-80) and a classifier (EfficientNet-Lite2,
ImageNet-1k); an escalation brings an image (a crop around an edge detection, or a whole
frame where the edge saw nothing) and the edge's hint (its label and score). Each model alone
is often confidently wrong on photos it was not tuned on (NanoDet calls horses "cow", the
classifier calls a person "sweatshirt" and a painting "bird"), so no single score is trusted:

1. The detector runs on the whole image (padded square): objects with boxes.
2. The classifier runs on the whole image and on a crop around each of the strongest
   detections, in one batch; its 1000 probabilities are summed up the taxonomy, so 118 dog
   breeds of 5 % make 0.6 of ``dog``, and a "sweatshirt" adds to ``person``.
3. Every concept that some source proposes becomes a :class:`Candidate` with *features*:
   the detector's score for it, the classifier's mass for it on the crop of that box and on
   the whole image, the largest single class behind that mass (one confident class, or
   many weak neighbours adding up), whether it is the whole image's strongest concept,
   whether the edge's hint agrees or disagrees, the box's size.
4. A logistic model fit on the labelled photos (:class:`Calibration`, committed in
   ``calibration.json`` with how it was fit) turns the features into the probability that a
   person would agree. Candidates at or above the calibrated threshold are the answer; when
   none is, the answer is ``unknown`` -- never the best guess.

Everything here is pure numpy on model outputs: the fit (``bench/quality.py --fit``) and the
service (:mod:`gateway._core._escalate`) run exactly the same code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway._core._taxonomy import COCO80, IMAGENET1K, OID24, ROOT, Taxonomy, taxonomy
from gateway._inference._detection import Box, Detection

__all__ = [
    "CALIBRATION_FILE",
    "FEATURES",
    "Calibration",
    "Candidate",
    "ObjectAnswer",
    "Observation",
    "candidates",
    "crop_boxes",
    "decide",
]

#: The committed calibration, fit by ``bench/quality.py --fit`` on tests/data/quality/.
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")

#: Names of the features, in the order of :attr:`Candidate.features`.
FEATURES = (
    "bias",
    "detector_logit",
    "from_detector",
    "crop_mass",
    "frame_mass",
    "frame_mass_boxed",
    "edge_agrees",
    "edge_disagrees",
    "sqrt_area",
    "crop_mass_on_detection",
    "sqrt_frame_mass",
    "sqrt_crop_mass",
    "detector_logit_classifier_blind",
    "frame_peak",
    "crop_peak",
    "frame_top",
)

#: Detections whose crops the classifier also sees (strongest first).
MAX_CROPS = 4
#: Detector boxes under this share of the image are not candidates (background clutter).
_MIN_AREA = 0.004
#: A detection under this share of its concept's best score in the image is not proposed.
_ECHO = 0.5
#: Concepts too general to be an answer a person would call naming the object.
_GENERIC = frozenset(
    {ROOT, "animal", "object", "scene", "plant", "food", "mammal", "invertebrate", "arthropod"}
)

Rgb = npt.NDArray[np.uint8]
_WHOLE = Box(0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True, slots=True)
class Observation:
    """The raw model outputs for one image (input of :func:`candidates`).

    ``detections`` are in the image's own coordinates; ``frame_probs`` is the classifier's
    softmax on the whole image; ``crop_probs[i]`` on :func:`crop_boxes` ``[i]``.
    """

    detections: tuple[Detection, ...]
    frame_probs: npt.NDArray[np.float32]
    crop_probs: tuple[npt.NDArray[np.float32], ...]
    detector_labels: tuple[str, ...]
    classifier_labels: tuple[str, ...]
    edge_label: str = ""
    edge_score: float = 0.0


@dataclass(slots=True)
class Candidate:
    """A concept one source proposed, where, and the evidence for it."""

    concept: str
    box: Box
    detector: float = 0.0
    crop_mass: float = 0.0
    frame_mass: float = 0.0
    edge: int = 0  # 1 agrees, -1 disagrees, 0 no hint
    #: Whether some classifier class is this concept or a kind of it (no ImageNet class is a
    #: giraffe or a kite: the classifier's silence then says nothing against the detector).
    classifier_knows: bool = True
    #: The largest single classifier class behind the concept's mass (on the whole image,
    #: on the crop of its box): one confident class, or many weak neighbours adding up.
    frame_peak: float = 0.0
    crop_peak: float = 0.0
    #: Whether the concept is (a kind of, or a kind above) the whole image's strongest one.
    frame_top: bool = False
    sources: set[str] = field(default_factory=set)

    @property
    def features(self) -> list[float]:
        """The feature vector, in :data:`FEATURES` order."""
        d = min(max(self.detector, 1e-3), 1 - 1e-3)
        from_det = 1.0 if self.detector > 0 else 0.0
        # The classifier's verdict on the whole image speaks for a whole-image candidate;
        # for a boxed one it only says the concept is somewhere (often in another box).
        whole = self.box == _WHOLE
        return [
            1.0,
            math.log(d / (1 - d)) * from_det,
            from_det,
            self.crop_mass,
            self.frame_mass if whole else 0.0,
            0.0 if whole else self.frame_mass,
            1.0 if self.edge > 0 else 0.0,
            1.0 if self.edge < 0 else 0.0,
            math.sqrt(max(self.box.area, 0.0)),
            # The classifier confirming the detector on the detector's own box.
            self.crop_mass * from_det,
            math.sqrt(self.frame_mass),
            math.sqrt(self.crop_mass),
            0.0 if self.classifier_knows else math.log(d / (1 - d)) * from_det,
            self.frame_peak if whole else 0.0,
            self.crop_peak,
            1.0 if self.frame_top and whole else 0.0,
        ]


@dataclass(frozen=True, slots=True)
class ObjectAnswer:
    """One object the core is confident about (``probability`` ≥ the threshold)."""

    concept: str
    probability: float
    box: Box
    #: Which sources proposed it: ``detector``, ``crop_classifier``, ``frame_classifier``, ``edge``.
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Calibration:
    """Logistic weights over :data:`FEATURES` and the threshold from which to answer."""

    weights: tuple[float, ...]
    threshold: float
    fit: dict[str, object] = field(default_factory=dict)

    def probability(self, features: Sequence[float]) -> float:
        """The calibrated probability that a person would agree with the candidate."""
        z = float(np.dot(self.weights, features))
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> Calibration:
        """Read a calibration file (see ``bench/quality.py --fit``)."""
        data = json.loads(path.read_text(encoding="utf-8"))
        if tuple(data["features"]) != FEATURES:
            raise ValueError(f"{path}: features {data['features']} are not {list(FEATURES)}")
        weights = tuple(float(w) for w in data["weights"])
        return cls(weights, float(data["threshold"]), dict(data.get("fit", {})))


def crop_boxes(detections: Sequence[Detection]) -> list[Box]:
    """The boxes whose crops the classifier sees: the strongest detections, distinct."""
    chosen: list[Box] = []
    for det in sorted(detections, key=lambda d: -d.score):
        if det.box.area < 0.01 or any(_iou(det.box, b) > 0.6 for b in chosen):
            continue
        chosen.append(det.box)
        if len(chosen) == MAX_CROPS:
            break
    return chosen


@dataclass(frozen=True, slots=True)
class _Masses:
    """What the classifier said about one image, per concept of the taxonomy.

    ``mass``: every concept with its descendants' probability (``dog`` holds all breeds);
    ``named``: only the concepts classes map to directly, the candidates for an answer
    (never an ancestor such as ``ungulate`` that merely collects them); ``peak``: the
    largest single class under each concept.
    """

    mass: dict[str, float]
    named: dict[str, float]
    peak: dict[str, float]


def _masses(probs: npt.NDArray[np.float32], labels: Sequence[str], tax: Taxonomy) -> _Masses:
    """Classifier probability summed per concept up the taxonomy (see :class:`_Masses`)."""
    concepts = tax.vocabulary(IMAGENET1K, labels)
    implied = tax.implied(IMAGENET1K, labels)
    mass: dict[str, float] = {}
    named: dict[str, float] = {}
    peak: dict[str, float] = {}
    for i in np.flatnonzero(probs >= 1e-3):
        p = float(probs[i])
        target = implied[i] or concepts[i]
        if target is None:
            continue
        named[target] = named.get(target, 0.0) + p
        for concept in tax.ancestors(target):
            mass[concept] = mass.get(concept, 0.0) + p
            peak[concept] = max(peak.get(concept, 0.0), p)
    return _Masses(mass, named, peak)


def _proposals(named: dict[str, float], mass: dict[str, float], k: int = 2) -> list[str]:
    """The ``k`` named concepts with the most mass (their own and their descendants')."""
    ranked = sorted(
        ((mass.get(c, 0.0), c) for c in named if c not in _GENERIC and c != "clothing"),
        reverse=True,
    )
    return [c for _, c in ranked[:k]]


def _classifier_concepts(labels: tuple[str, ...], tax: Taxonomy) -> frozenset[str]:
    """Every concept some classifier class is, or is a kind of."""
    key = (labels, id(tax))
    found = _KNOWN.get(key)
    if found is None:
        concepts = tax.vocabulary(IMAGENET1K, labels)
        implied = tax.implied(IMAGENET1K, labels)
        found = frozenset(
            a
            for c, i in zip(concepts, implied, strict=True)
            if (i or c) is not None
            for a in tax.ancestors(i or c or "")
        )
        _KNOWN[key] = found
    return found


_KNOWN: dict[tuple[tuple[str, ...], int], frozenset[str]] = {}


def candidates(obs: Observation, tax: Taxonomy | None = None) -> list[Candidate]:
    """Every concept a source proposes for ``obs``, with its evidence (merged per object)."""
    tax = tax or taxonomy()
    det_concepts = tax.vocabulary(COCO80, obs.detector_labels)
    frame = _masses(obs.frame_probs, obs.classifier_labels, tax)
    boxes = crop_boxes(obs.detections)
    crops = [_masses(p, obs.classifier_labels, tax) for p in obs.crop_probs]
    edge_concept = None
    if obs.edge_label:
        edge_concept = tax.vocabulary(OID24, [obs.edge_label])[0] or tax.canonical(obs.edge_label)
    whole = _WHOLE
    found: list[Candidate] = []

    def add(concept: str, box: Box, source: str, detector: float = 0.0) -> None:
        for c in found:
            if c.concept == concept and _iou(c.box, box) > 0.5:
                c.detector = max(c.detector, detector)
                c.sources.add(source)
                return
        found.append(Candidate(concept, box, detector=detector, sources={source}))

    strongest: dict[str, float] = {}
    for det in obs.detections:
        concept = det_concepts[det.class_id]
        if concept is not None:
            strongest[concept] = max(strongest.get(concept, 0.0), det.score)
    for det in obs.detections:
        concept = det_concepts[det.class_id]
        if concept is None or det.box.area < _MIN_AREA:
            continue
        # A box of a concept at under half the score of its best box in the image is the
        # detector echoing that object on clutter (a "ball" on every round shape once it
        # has seen the ball), not another object.
        if det.score < _ECHO * strongest[concept]:
            continue
        add(concept, det.box, "detector", det.score)
    for box, crop in zip(boxes, crops, strict=True):
        for concept in _proposals(crop.named, crop.mass):
            add(concept, box, "crop_classifier")
    frame_proposals = _proposals(frame.named, frame.mass, k=3)
    for concept in frame_proposals:
        add(concept, whole, "frame_classifier")
    if edge_concept is not None and edge_concept not in _GENERIC:
        add(edge_concept, whole, "edge")

    known = _classifier_concepts(obs.classifier_labels, tax)
    top = frame_proposals[0] if frame_proposals else None
    for cand in found:
        cand.classifier_knows = cand.concept in known
        cand.frame_mass = frame.mass.get(cand.concept, 0.0)
        cand.frame_peak = frame.peak.get(cand.concept, 0.0)
        cand.frame_top = top is not None and tax.related(cand.concept, top)
        for box, crop in zip(boxes, crops, strict=True):
            if _iou(box, cand.box) > 0.5:
                cand.crop_mass = max(cand.crop_mass, crop.mass.get(cand.concept, 0.0))
                cand.crop_peak = max(cand.crop_peak, crop.peak.get(cand.concept, 0.0))
        if edge_concept is not None and edge_concept not in _GENERIC:
            cand.edge = 1 if tax.related(cand.concept, edge_concept) else -1
    return found


def decide(
    found: Sequence[Candidate], calibration: Calibration, tax: Taxonomy | None = None
) -> tuple[list[ObjectAnswer], float]:
    """The confident objects (most probable first, one per object) and the best probability.

    An object is answered once: a candidate that overlaps an answer and names the same
    thing or a more general one (``animal`` after ``dog``) is dropped; one that names a kind
    of it (``butterfly`` after ``insect``), also above the threshold, replaces it -- the
    most specific confident name is the useful one.
    """
    tax = tax or taxonomy()
    scored = sorted(
        ((calibration.probability(c.features), c) for c in found), key=lambda pc: -pc[0]
    )
    best = scored[0][0] if scored else 0.0
    # Boxed objects first: a whole-image "dog" must not hide the three dogs it summarises;
    # it is answered only where no boxed answer names the same thing.
    scored.sort(key=lambda pc: pc[1].box == _WHOLE)
    answers: list[ObjectAnswer] = []
    for p, cand in scored:
        if p < calibration.threshold:
            continue
        answer = ObjectAnswer(cand.concept, p, cand.box, tuple(sorted(cand.sources)))
        same = [
            i
            for i, a in enumerate(answers)
            if tax.related(a.concept, cand.concept) and _overlaps(a.box, cand.box)
        ]
        if not same:
            answers.append(answer)
            continue
        for i in same:
            a = answers[i]
            if cand.concept != a.concept and tax.is_a(cand.concept, a.concept):
                answers[i] = answer
                break
    return answers, best


def _overlaps(a: Box, b: Box) -> bool:
    """Whether two boxes are taken for one object: a third of the smaller one is shared."""
    if _WHOLE in (a, b):
        return True
    ix = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    iy = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    smaller = min(a.area, b.area)
    return smaller > 0 and ix * iy / smaller > 0.3


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    iy = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0
