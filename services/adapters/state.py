"""The state the compacted `adapters` topic describes, folded from its events (no I/O, no torch).

Used by every reader of the topic: policy replicas (which version each alias names, what was
published) and the Admin service (which also needs each alias's trail for rollback).

The trail rule: moving an alias to a version already on its trail returns to it (the versions after
it are dropped); moving it to any other version appends. So promote v1, v2, v3, rollback (-> v2),
rollback (-> v1) walks back as an operator expects, and a second rollback never bounces back to the
version just rolled back from. The trail is only as long as what the process has read: the topic is
compacted, so after a restart an alias may be known only by its last move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spr.v1 import adapters_pb2


@dataclass
class AdapterHistory:
    """What the topic says: published manifests, each alias's last move, and its trail of versions."""

    manifests: dict[str, adapters_pb2.AdapterManifest] = field(default_factory=dict)
    moves: dict[str, adapters_pb2.AliasUpdate] = field(default_factory=dict)
    trails: dict[str, list[str]] = field(default_factory=dict)

    @property
    def aliases(self) -> dict[str, str]:
        """Alias -> version, as replicas see it ("" = the base model)."""
        return {alias: update.version for alias, update in self.moves.items()}

    def apply(self, event: adapters_pb2.AdapterEvent) -> None:
        """Fold one topic event into the state."""
        kind = event.WhichOneof("event")
        if kind == "published":
            self.manifests[event.published.version] = event.published
        elif kind == "alias":
            self._move(event.alias)

    def _move(self, update: adapters_pb2.AliasUpdate) -> None:
        self.moves[update.alias] = update
        trail = self.trails.setdefault(update.alias, [])
        if update.version in trail:
            del trail[trail.index(update.version) + 1 :]
        else:
            trail.append(update.version)

    def current(self, alias: str) -> str | None:
        """The version ``alias`` names, or None when it was never set."""
        update = self.moves.get(alias)
        return None if update is None else update.version

    def previous(self, alias: str) -> str | None:
        """The version ``alias`` named before its current one, or None when not on record."""
        trail = self.trails.get(alias, [])
        return trail[-2] if len(trail) >= 2 else None
