"""Escalation answers shared by core replicas: the first answer stored for (gateway,
escalation id) is the one every replica replies with, on SQLite (one core) and PostgreSQL
(replicas on the registry's database)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway import CoreEscalationSettings, EscalateService
from gateway._core._escalate import AnswerStore
from gateway._core._escalate_answers import Answers, PostgresAnswerStore
from protos.edgeward.v1 import common_pb2, core_pb2
from tests.conftest import PHOTOS, ROOT

TTL_S = 100.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def result(label: str, model_ms: float, escalation_id: str = "esc-1") -> core_pb2.EscalationResult:
    return core_pb2.EscalationResult(
        answer=common_pb2.EscalationAnswer(escalation_id=escalation_id, label=label, score=0.9),
        model_ms=model_ms,
    )


StoreFactory = Callable[[], Answers]


@pytest.fixture(params=["sqlite", "postgresql"])
def replicas(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Clock, StoreFactory]]:
    """A factory of stores on one shared place (as each replica opens its own)."""
    clock = Clock()
    opened: list[Answers] = []
    if request.param == "postgresql":
        url = str(request.getfixturevalue("postgres_url"))

        def make() -> Answers:
            store = PostgresAnswerStore(url, max_entries=1000, ttl_s=TTL_S, clock=clock)
            opened.append(store)
            return store
    else:

        def make() -> Answers:
            store = AnswerStore(
                tmp_path / "answers.sqlite3", max_entries=1000, ttl_s=TTL_S, clock=clock
            )
            opened.append(store)
            return store

    yield clock, make
    for store in opened:
        store.close()


def test_the_first_stored_answer_wins_on_every_replica(
    replicas: tuple[Clock, StoreFactory],
) -> None:
    _clock, make = replicas
    a, b = make(), make()
    first, second = result("Cat", 11.0), result("Dog", 22.0)
    assert a.put("gw-1", "esc-1", first) == first
    assert b.put("gw-1", "esc-1", second) == first  # b ran too; it replies with a's answer
    assert b.get("gw-1", "esc-1") == first
    assert a.get("gw-1", "esc-1") == first
    # Keyed by gateway: another gateway's escalation with the same id is its own.
    assert b.put("gw-2", "esc-1", second) == second
    assert a.get("gw-2", "esc-1") == second
    assert a.get("gw-3", "esc-1") is None
    assert a.count() == b.count() == 2


def test_concurrent_answers_from_replicas_agree(replicas: tuple[Clock, StoreFactory]) -> None:
    _clock, make = replicas
    stores = [make(), make()]
    barrier = threading.Barrier(8)

    def answer(i: int) -> core_pb2.EscalationResult:
        barrier.wait(timeout=30)
        return stores[i % 2].put("gw-1", "esc-race", result(f"label-{i}", float(i), "esc-race"))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(answer, range(8)))
    assert len({r.SerializeToString() for r in replies}) == 1
    assert stores[0].get("gw-1", "esc-race") == replies[0]
    assert stores[1].count() == 1


def test_an_expired_answer_counts_as_absent(replicas: tuple[Clock, StoreFactory]) -> None:
    clock, make = replicas
    store = make()
    old, new = result("Cat", 1.0), result("Dog", 2.0)
    store.put("gw-1", "esc-1", old)
    clock.now += TTL_S - 1
    assert store.get("gw-1", "esc-1") == old
    clock.now += 2
    assert store.get("gw-1", "esc-1") is None
    assert store.put("gw-1", "esc-1", new) == new
    assert store.get("gw-1", "esc-1") == new


class LateReplica:
    """A replica's view of the store that checked before another replica stored its answer
    (its ``get`` found nothing), so it runs the models too."""

    def __init__(self, store: Answers) -> None:
        self.store = store

    def get(self, gateway_id: str, escalation_id: str) -> core_pb2.EscalationResult | None:
        return None

    def put(
        self, gateway_id: str, escalation_id: str, result: core_pb2.EscalationResult
    ) -> core_pb2.EscalationResult:
        return self.store.put(gateway_id, escalation_id, result)

    def count(self) -> int:
        return self.store.count()

    def close(self) -> None:
        self.store.close()


@pytest.mark.slow
def test_two_replicas_answering_one_escalation_reply_the_same(postgres_url: str) -> None:
    settings = CoreEscalationSettings(models_dir=ROOT / "models", providers="cpu")
    image = (PHOTOS / "motorcycle.jpg").read_bytes()
    with (
        contextlib.closing(PostgresAnswerStore(postgres_url, max_entries=10, ttl_s=60)) as a,
        contextlib.closing(PostgresAnswerStore(postgres_url, max_entries=10, ttl_s=60)) as b,
    ):
        first = EscalateService(settings, store=a)
        late = EscalateService(settings, store=LateReplica(b))
        key = ("gw-1", "esc-moto")
        answer_a, _ = first._answer_sync(key, image, True, frame_id="f", edge=("", 0.0))
        answer_b, replayed = late._answer_sync(key, image, True, frame_id="f", edge=("", 0.0))
        assert not replayed
        assert late.models.runs == 1  # it did run the models ...
        assert answer_b == answer_a  # ... but replies with the first-stored answer
        assert answer_a.answer.label == "motorcycle"
        assert b.count() == 1
