"""Replaying the adapters topic: aliases, manifests, and the trail rollback walks back along."""

from __future__ import annotations

from services.adapters.state import AdapterHistory
from spr.v1 import adapters_pb2


def _move(alias: str, version: str) -> adapters_pb2.AdapterEvent:
    return adapters_pb2.AdapterEvent(alias=adapters_pb2.AliasUpdate(alias=alias, version=version))


def _replay(*moves: tuple[str, str]) -> AdapterHistory:
    history = AdapterHistory()
    for alias, version in moves:
        history.apply(_move(alias, version))
    return history


def test_aliases_and_manifests_follow_the_events() -> None:
    history = _replay(("latest", "v1"), ("stable", "v1"), ("latest", "v2"))
    history.apply(adapters_pb2.AdapterEvent(published=adapters_pb2.AdapterManifest(version="v2")))
    assert history.aliases == {"latest": "v2", "stable": "v1"}
    assert set(history.manifests) == {"v2"}
    assert history.current("latest") == "v2" and history.current("nope") is None


def test_previous_walks_back_and_never_bounces_to_the_version_rolled_back_from() -> None:
    history = _replay(("latest", "v1"), ("latest", "v2"), ("latest", "v3"))
    assert history.previous("latest") == "v2"
    history.apply(_move("latest", "v2"))  # a rollback
    assert history.previous("latest") == "v1"
    history.apply(_move("latest", "v1"))
    assert history.previous("latest") is None


def test_a_new_version_after_a_rollback_extends_the_trail_from_there() -> None:
    history = _replay(("latest", "v1"), ("latest", "v2"), ("latest", "v1"), ("latest", "v3"))
    assert history.trails["latest"] == ["v1", "v3"]
    assert history.previous("latest") == "v1"


def test_repeated_moves_to_the_same_version_change_nothing() -> None:
    history = _replay(("stable", "v1"), ("stable", "v2"), ("stable", "v2"))
    assert history.trails["stable"] == ["v1", "v2"]


def test_an_alias_known_only_by_its_last_move_has_no_previous_version() -> None:
    # What a restarted admin sees once compaction kept only the last record of the alias.
    assert _replay(("stable", "v5")).previous("stable") is None
