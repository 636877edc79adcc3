"""Deterministic short ids, so that replays and retries produce the same keys (idempotent effects)."""

from __future__ import annotations

import hashlib
import json

ID_HEX_CHARS = 16  # 64 bits: collisions stay negligible far beyond a dataset's region count


def stable_id(*parts: str | int | list[int]) -> str:
    """Short sha256 hex of the parts; JSON-encoded so that ("a", "bc") and ("ab", "c") differ."""
    payload = json.dumps(parts, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:ID_HEX_CHARS]
