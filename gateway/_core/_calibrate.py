"""Judging answers against labelled photos, and fitting the core's calibration on them.

A labelled set is a directory of JPEGs with a ``labels.json`` (``tests/data/quality/`` is
the project's): per photo, the objects a person would name, as taxonomy concepts with
approximate boxes. An answer (a concept, a box, a probability) is

- ``correct`` when it names a labelled object, or a kind of it ("dog" for a labelled dog),
  whose box overlaps the answer's (a whole-frame answer overlaps everything);
- ``general`` when it names something a labelled object is a kind of ("animal" for a
  horse): true, but it names nothing -- not counted as recall, not counted as wrong;
- ``wrong`` otherwise ("cattle" for a horse, "bird" for a painting).

:func:`fit` fits the logistic weights of :mod:`gateway._core._identify` on candidates
labelled correct (1) or wrong (0); :func:`fit_calibration` then picks the threshold by the
figures a device would see on the training photos: the lowest one (at least 0.5) at which
at most ``max_wrong`` of all answers -- the edge's that stand, the core's, and its
``unknown`` -- are confidently wrong. :func:`leave_one_out` repeats the whole fit without
each photo in turn and judges that photo with it, so the figures it reports are for photos
the fit never saw.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from gateway._core._identify import FEATURES, Calibration, Candidate, ObjectAnswer, decide
from gateway._core._taxonomy import Taxonomy, taxonomy
from gateway._inference._detection import Box

__all__ = [
    "Labelled",
    "Verdict",
    "fit",
    "fit_calibration",
    "judge",
    "leave_one_out",
    "load_labelled",
    "to_frame",
]

Verdict = Literal["correct", "general", "wrong"]
_WHOLE = Box(0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True, slots=True)
class Labelled:
    """One photo of a labelled set and the objects a person named in it."""

    name: str
    path: Path
    objects: tuple[tuple[str, Box], ...]


def load_labelled(directory: Path) -> list[Labelled]:
    """The photos of ``directory/labels.json``, in name order."""
    data = json.loads((directory / "labels.json").read_text(encoding="utf-8"))
    photos: list[Labelled] = []
    for name, objects in sorted(data["photos"].items()):
        photos.append(
            Labelled(
                name,
                directory / f"{name}.jpg",
                tuple((concept, Box(*box)) for concept, box in objects),
            )
        )
    return photos


def to_frame(box: Box, region: Box) -> Box:
    """``box`` relative to ``region`` (a crop of the frame) as a box of the frame."""
    w, h = region.x_max - region.x_min, region.y_max - region.y_min
    return Box(
        region.x_min + box.x_min * w,
        region.y_min + box.y_min * h,
        region.x_min + box.x_max * w,
        region.y_min + box.y_max * h,
    )


def _overlap(a: Box, b: Box) -> bool:
    if _WHOLE in (a, b):
        return True
    ix = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    iy = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    inter = ix * iy
    # Boxes are approximate: a third of the smaller one inside the other is the same object.
    return inter >= 0.33 * min(a.area, b.area)


def judge(
    concept: str, box: Box, photo: Labelled, tax: Taxonomy | None = None
) -> tuple[Verdict, str | None]:
    """The verdict on one answer, and the labelled concept it recalls (if ``correct``)."""
    tax = tax or taxonomy()
    general = False
    for label, label_box in photo.objects:
        if not _overlap(box, label_box):
            continue
        if tax.is_a(concept, label):
            return "correct", label
        if tax.is_a(label, concept):
            general = True
    return ("general" if general else "wrong"), None


# ---------------------------------------------------------------------------- fitting
@dataclass(frozen=True, slots=True)
class Example:
    """One candidate of one escalated image, with its verdict."""

    photo: str
    features: tuple[float, ...]
    verdict: Verdict


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 2.0, steps: int = 3000) -> np.ndarray:
    """Weights maximising the L2-penalised log-likelihood (Newton's method, bias free)."""
    w = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(min(steps, 50)):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + penalty * w
        hess = (x.T * (p * (1 - p))) @ x + np.diag(penalty + 1e-6)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w


def _threshold(probs: np.ndarray, wrong: np.ndarray, max_wrong: float, floor: float) -> float:
    """The lowest threshold (≥ ``floor``) at which at most ``max_wrong`` of answers are wrong."""
    order = np.argsort(-probs)
    best = 1.0
    n_wrong = 0
    for k, i in enumerate(order, start=1):
        n_wrong += int(wrong[i])
        if probs[i] < floor:
            break
        if n_wrong / k <= max_wrong:
            best = float(probs[i])
    return best


def fit(examples: Sequence[Example], *, max_wrong: float = 0.01, floor: float = 0.5) -> Calibration:
    """Logistic weights on correct-vs-wrong candidates and the threshold for ``max_wrong``.

    This threshold counts candidates (three sources proposing one object count three
    times); :func:`fit_calibration` keeps the weights and chooses the threshold on answers.
    """
    usable = [e for e in examples if e.verdict != "general"]
    x = np.array([e.features for e in usable], dtype=np.float64)
    y = np.array([1.0 if e.verdict == "correct" else 0.0 for e in usable])
    w = _logistic(x, y)
    probs = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
    threshold = _threshold(probs, 1 - y, max_wrong, floor)
    return Calibration(tuple(float(v) for v in w), threshold)


@dataclass(slots=True)
class Tally:
    """Recall, wrong and unknown counts over a set of photos."""

    objects: int = 0
    recalled: int = 0
    answers: int = 0
    confident_wrong: int = 0
    unknown: int = 0
    escalations: int = 0

    def add_photo(
        self,
        photo: Labelled,
        answers: Sequence[tuple[str, Box, float]],
        unknowns: int,
        tax: Taxonomy | None = None,
    ) -> None:
        """Judge one photo's ``answers`` (concept, frame box, score) and ``unknowns``."""
        tax = tax or taxonomy()
        named = {concept for concept, _ in photo.objects}
        found: set[str] = set()
        for concept, box, score in answers:
            verdict, label = judge(concept, box, photo, tax)
            if label is not None:
                found.add(label)
            if verdict == "wrong" and score >= 0.5:
                self.confident_wrong += 1
        self.objects += len(named)
        self.recalled += len(found & named)
        self.answers += len(answers) + unknowns
        self.unknown += unknowns

    def report(self) -> dict[str, float]:
        """The rates (0 where nothing was counted)."""
        return {
            "objects": self.objects,
            "recall": round(self.recalled / self.objects, 3) if self.objects else 0.0,
            "confident_wrong_rate": round(self.confident_wrong / self.answers, 3)
            if self.answers
            else 0.0,
            "unknown_rate": round(self.unknown / self.answers, 3) if self.answers else 0.0,
        }


@dataclass(frozen=True, slots=True)
class Escalated:
    """The candidates of one image the core saw: the frame region it covers, the photo.

    ``sent``: whether the policy escalates it (images only used for fitting are not).
    """

    photo: str
    region: Box
    candidates: tuple[Candidate, ...]
    sent: bool = True


def examples_of(escalated: Sequence[Escalated], photos: dict[str, Labelled]) -> list[Example]:
    """Every candidate as a fitting example (its box moved into frame coordinates)."""
    tax = taxonomy()
    out: list[Example] = []
    for esc in escalated:
        for cand in esc.candidates:
            box = to_frame(cand.box, esc.region)
            verdict, _ = judge(cand.concept, box, photos[esc.photo], tax)
            out.append(Example(esc.photo, tuple(cand.features), verdict))
    return out


def answers_of(esc: Escalated, calibration: Calibration) -> tuple[list[ObjectAnswer], bool]:
    """The core's answers for one escalated image, and whether it said ``unknown``."""
    objects, _best = decide(esc.candidates, calibration)
    return objects, not objects


EdgeAnswers = dict[str, list[tuple[str, Box, float]]]


def tally_photos(
    escalated: Sequence[Escalated],
    photos: dict[str, Labelled],
    edge: EdgeAnswers,
    calibration: Calibration,
    names: Sequence[str] | None = None,
) -> Tally:
    """The figures a device would see on ``names`` (default: all photos) with ``calibration``.

    A photo's answers are the edge's for what it did not escalate (``edge``) and the core's
    for what the policy sent (``Escalated.sent``), as a device gets them.
    """
    tax = taxonomy()
    tally = Tally()
    for name in names if names is not None else list(photos):
        answers: list[tuple[str, Box, float]] = list(edge.get(name, ()))
        unknowns = 0
        for esc in (e for e in escalated if e.photo == name and e.sent):
            objects, unknown = answers_of(esc, calibration)
            unknowns += int(unknown)
            answers += [(o.concept, to_frame(o.box, esc.region), o.probability) for o in objects]
        tally.add_photo(photos[name], answers, unknowns, tax)
    return tally


def fit_calibration(
    escalated: Sequence[Escalated],
    photos: dict[str, Labelled],
    edge: EdgeAnswers,
    *,
    max_wrong: float = 0.03,
    floor: float = 0.5,
) -> Calibration:
    """Weights fit on every candidate of ``photos``; the threshold chosen by their figures.

    The threshold is the lowest calibrated probability (at least ``floor``) at which the
    share of confidently wrong answers over ``photos`` -- as :func:`tally_photos` counts
    them -- is at most ``max_wrong``: it is chosen on what a device would be told, not on
    candidates (one object proposed by three sources is one answer, not three).
    """
    examples = examples_of([e for e in escalated if e.photo in photos], photos)
    weights = fit(examples).weights
    sent = [e for e in escalated if e.photo in photos and e.sent]
    probe = Calibration(weights, 1.0)
    levels = sorted(
        {p for e in sent for c in e.candidates if (p := probe.probability(c.features)) >= floor},
        reverse=True,
    )
    best = 1.0
    for level in levels:
        candidate = Calibration(weights, level)
        tally = tally_photos(sent, photos, edge, candidate)
        if tally.answers and tally.confident_wrong / tally.answers <= max_wrong:
            best = level
    return Calibration(weights, best)


def leave_one_out(
    escalated: Sequence[Escalated],
    photos: dict[str, Labelled],
    edge: EdgeAnswers,
    **fit_args: float,
) -> dict[str, float]:
    """Figures for each photo judged by a fit (weights and threshold) made without it."""
    total = Tally()
    for name in photos:
        rest = {n: p for n, p in photos.items() if n != name}
        held = fit_calibration(escalated, rest, edge, **fit_args)
        one = tally_photos(escalated, photos, edge, held, [name])
        total.objects += one.objects
        total.recalled += one.recalled
        total.answers += one.answers
        total.confident_wrong += one.confident_wrong
        total.unknown += one.unknown
    return total.report()


def ceiling(
    escalated: Sequence[Escalated], photos: dict[str, Labelled], *, sent_only: bool
) -> float:
    """Recall if every correct candidate were answered: what the models could reach at best.

    ``sent_only``: only the images the policy escalates (else every image looked at).
    """
    named = {(name, c) for name, p in photos.items() for c, _ in p.objects}
    found: set[tuple[str, str]] = set()
    for esc in escalated:
        if sent_only and not esc.sent:
            continue
        for cand in esc.candidates:
            _verdict, label = judge(cand.concept, to_frame(cand.box, esc.region), photos[esc.photo])
            if label is not None:
                found.add((esc.photo, label))
    return round(len(found & named) / len(named), 3) if named else 0.0


def calibration_json(calibration: Calibration, fit_info: dict[str, object]) -> str:
    """The calibration file's text."""
    data = {
        "features": list(FEATURES),
        "weights": [round(w, 6) for w in calibration.weights],
        "threshold": round(calibration.threshold, 6),
        "fit": fit_info,
    }
    return json.dumps(data, indent=1) + "\n"
