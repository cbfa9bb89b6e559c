"""The combination rules on hand-made evidence (the models' outputs are a seam we own)."""

from __future__ import annotations

from gateway import Box
from gateway._core._identify import FEATURES, Calibration, Candidate, decide

WHOLE = Box(0.0, 0.0, 1.0, 1.0)
# A calibration whose probability is the detector's score or the frame mass, whichever
# applies, so each case reads like the evidence it was given.
DETECTOR_ONLY = Calibration(
    tuple(1.0 if name == "detector_logit" else 0.0 for name in FEATURES), threshold=0.6
)


def cand(concept: str, detector: float, box: Box = WHOLE) -> Candidate:
    return Candidate(concept, box, detector=detector, sources={"detector"})


def test_below_the_threshold_the_answer_is_unknown_not_the_best_guess() -> None:
    answers, best = decide([cand("cattle", 0.55, Box(0.1, 0.1, 0.4, 0.6))], DETECTOR_ONLY)
    assert answers == []
    assert abs(best - 0.55) < 1e-6


def test_a_whole_frame_answer_does_not_hide_the_objects_it_summarises() -> None:
    dogs = [cand("dog", 0.9, Box(x, 0.2, x + 0.2, 0.9)) for x in (0.05, 0.4, 0.7)]
    answers, _ = decide([cand("dog", 0.95), *dogs], DETECTOR_ONLY)
    assert [a.concept for a in answers] == ["dog"] * 3
    assert WHOLE not in [a.box for a in answers]


def test_one_answer_per_object_and_the_specific_name_wins() -> None:
    box = Box(0.2, 0.2, 0.8, 0.8)
    answers, _ = decide(
        [cand("insect", 0.9, box), cand("butterfly", 0.8, box), cand("animal", 0.85, box)],
        DETECTOR_ONLY,
    )
    assert [(a.concept, round(a.probability, 2)) for a in answers] == [("butterfly", 0.8)]


def test_unrelated_objects_in_one_place_are_both_answered() -> None:
    box = Box(0.2, 0.2, 0.8, 0.8)
    answers, _ = decide([cand("person", 0.9, box), cand("horse", 0.8, box)], DETECTOR_ONLY)
    assert [a.concept for a in answers] == ["person", "horse"]
