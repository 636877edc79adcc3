"""The join state machine without Kafka: arrival order, duplicates, late records, timeouts, commit points."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.kafka_io import ConsumedRecord
from services.pairs.join import JoinState, Kind, Status
from services.pairs.logic import PairRules, RecordsMismatch, decide, run_mismatch, timed_out
from spr.v1 import pairs_pb2
from tests.pairs.records import description, localization, semantic

DESC, LOC, SEM = "descriptions", "scores.localization", "scores.semantic"
KINDS = {DESC: Kind.DESCRIPTION, LOC: Kind.LOCALIZATION, SEM: Kind.SEMANTIC}


def _state(capacity: int = 100) -> JoinState:
    return JoinState(KINDS, KINDS.values(), capacity)


def _consumed(topic: str, offset: int, message: Any, partition: int = 0) -> ConsumedRecord[Any]:
    key = message.region.region_id if topic == DESC else message.region_id
    return ConsumedRecord(topic, partition, offset, key, message, 1, 0, ())


def _three(region_id: str, offsets: tuple[int, int, int] = (0, 0, 0)) -> list[ConsumedRecord[Any]]:
    record = description(region_id)
    return [
        _consumed(DESC, offsets[0], record),
        _consumed(LOC, offsets[1], localization(record)),
        _consumed(SEM, offsets[2], semantic(record)),
    ]


def test_any_arrival_order_completes_on_the_last_record() -> None:
    desc, loc, sem = _three("r1")
    state = _state()
    assert state.add(sem, now=0.0).status is Status.OPENED
    assert state.add(desc, now=1.0).status is Status.WAITING
    added = state.add(loc, now=2.0)
    assert added.status is Status.COMPLETE and added.region is not None
    assert added.region.opened_at == 0.0
    assert added.region.message(Kind.DESCRIPTION) is desc.message
    assert state.open_count == 1  # open until the caller closes it
    state.close(added.region)
    assert state.open_count == 0 and state.is_decided("r1")


def test_duplicates_while_open_and_records_after_the_decision_are_dropped() -> None:
    desc, loc, sem = _three("r1")
    state = _state()
    state.add(desc, now=0.0)
    again = _consumed(DESC, 7, desc.message)
    assert state.add(again, now=0.1).status is Status.DUPLICATE
    state.add(loc, now=0.2)
    region = state.add(sem, now=0.3).region
    assert region is not None and region.records[Kind.DESCRIPTION].offset == 0  # the first one is kept
    state.close(region)
    assert state.add(_consumed(LOC, 9, loc.message), now=1.0).status is Status.LATE
    assert state.open_count == 0


def test_the_decided_memory_is_a_bounded_lru() -> None:
    state = _state(capacity=2)
    for region_id in ("a", "b", "c"):
        state.remember_decided(region_id)
    assert not state.is_decided("a") and state.is_decided("b") and state.is_decided("c")
    state.remember_decided("b")  # refreshed: "c" is now the oldest
    state.remember_decided("d")
    assert state.is_decided("b") and not state.is_decided("c")


def test_overdue_regions_wait_while_their_missing_partitions_lag() -> None:
    state = _state()
    desc, loc, _ = _three("r1")
    state.add(desc, now=0.0)
    state.add(loc, now=5.0)
    late_desc = _three("r2")[0]
    state.add(late_desc, now=8.0)
    assert state.overdue(9.0, timeout_s=10.0, caught_up=lambda t, p: True) == []
    lagging = state.overdue(11.0, timeout_s=10.0, caught_up=lambda topic, p: topic != SEM)
    assert lagging == []  # r1 misses only a semantic record, whose partition is not caught up
    due = state.overdue(11.0, timeout_s=10.0, caught_up=lambda t, p: True)
    assert [r.region_id for r in due] == ["r1"]
    assert state.missing(due[0]) == [SEM]
    assert state.missing(state.add(_three("r3")[1], now=11.0).region) == [DESC, SEM]  # type: ignore[arg-type]


def test_commit_offset_stops_at_the_oldest_open_region_on_each_partition() -> None:
    state = _state()
    a, b = _three("a", (10, 20, 30)), _three("b", (11, 21, 31))
    state.add(a[0], now=0.0, pairs_mark=100)  # a: description only
    for record in b:
        added = state.add(record, now=0.0, pairs_mark=105)
    assert added.status is Status.COMPLETE and added.region is not None
    state.close(added.region)  # b decided
    # a still needs its scores: the description partition must be re-read from a's record.
    assert state.commit_offset(DESC, 0, consumed_next=12) == 10
    assert state.commit_offset(LOC, 0, consumed_next=22) == 22
    assert state.commit_offset(DESC, 1, consumed_next=5) == 5  # other partition: nothing open
    assert state.pairs_from(0, pairs_next=107) == 100
    assert state.pairs_from(1, pairs_next=3) == 3
    state.add(a[1], now=1.0)
    assert state.commit_offset(LOC, 0, consumed_next=22) == 20
    assert state.drop_partitions([0]) == 1
    assert state.commit_offset(DESC, 0, consumed_next=12) == 12 and state.open_count == 0


def test_mismatched_candidates_or_run_ids_are_reported() -> None:
    record = description("r1", run_id="run-a")
    loc, sem = localization(record), semantic(record)
    rules = PairRules(run_id="run-a")
    assert run_mismatch(record, loc, sem) == "" and run_mismatch(record, loc, None) == ""
    assert decide(record, loc, sem, rules).region_id == "r1"
    other = description("r1", candidates=7, run_id="run-a")
    with pytest.raises(RecordsMismatch, match="localization scores name candidates"):
        decide(other, loc, sem, rules)
    with pytest.raises(RecordsMismatch, match="semantic scores name candidates"):
        decide(other, localization(other), sem, rules)
    reordered = localization(record)
    reordered.scores.reverse()  # the same candidates in another order still match
    assert decide(record, reordered, sem, rules).region_id == "r1"
    sem.lineage.run_id = "run-b"
    assert "semantic scores are of run 'run-b'" in run_mismatch(record, loc, sem)


def test_a_timed_out_region_is_a_skip_with_its_lineage() -> None:
    record = description("r1")
    decision = timed_out("r1", record, [SEM], 12.5, PairRules(run_id="run-x"))
    assert decision.skip == pairs_pb2.SKIP_REASON_SCORES_TIMED_OUT
    assert decision.region_id == "r1" and SEM in decision.detail and "12.5s" in decision.detail
    assert decision.lineage.adapter_version == record.lineage.adapter_version
    assert decision.lineage.run_id == "run-x"
    assert timed_out("r2", None, [DESC], 1.0, PairRules()).WhichOneof("decision") == "skip"
