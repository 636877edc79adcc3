"""Multi-LoRA residency on one policy replica: which versions are loaded, what the aliases mean.

Rules (SPEC section 3, "Adapter lifecycle"):
- a version is verified (sha256 of every file, base model id) and loaded completely before any
  alias points at it, so no request is ever served by a half-loaded or wrong adapter;
- the last `max_resident` versions stay loaded (LRU); versions an alias points at are never evicted;
- a request names a version, an alias, or "" for the base model; a version that is not resident
  is loaded on demand from the store, an unknown one is refused with `AdapterNotFound`.

All mutation happens under one lock that `generate` also holds while a batch runs, so loading,
evicting and switching never interleave with a forward pass.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from peft import PeftModel

from services.adapters.store import AdapterStore, AdapterStoreError

BASE = ""
# Until the trainer publishes, the standard aliases mean the base model: a fresh deployment serves
# requests for "latest" instead of failing them.
DEFAULT_ALIASES = {"latest": BASE, "stable": BASE}


class AdapterNotFound(LookupError):
    """The requested adapter version or alias is unknown to this replica and to the store."""


@dataclass
class AdapterStats:
    load_seconds: float
    requests_served: int = 0
    loaded_at: float = field(default_factory=time.time)


class AdapterRegistry:
    """Holds the (possibly PEFT-wrapped) policy model and its resident adapters."""

    def __init__(self, model: Any, store: AdapterStore | None, base_model_id: str, max_resident: int = 4):
        self.model = model
        self.store = store
        self.base_model_id = base_model_id
        self.max_resident = max_resident
        self.aliases: dict[str, str] = dict(DEFAULT_ALIASES)
        self.resident: OrderedDict[str, AdapterStats] = OrderedDict()
        self.lock = threading.RLock()
        self.revision = 0  # bumped on every load, unload and alias move: lets observers skip no-op refreshes

    # -- resolution -------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """Map a request's adapter (version, alias or "") to a resident version, loading it if needed."""
        with self.lock:
            if name == BASE or name == "base":
                return BASE
            version = self.aliases.get(name, name)
            if version == BASE:
                return BASE
            if version not in self.resident:
                self.load(version)
            return version

    # -- loading ----------------------------------------------------------------------------
    def load(self, version: str) -> float:
        """Verify and load `version` (no-op when resident); return the load time in seconds."""
        with self.lock:
            if version in self.resident:
                self.resident.move_to_end(version)
                return 0.0
            if self.store is None:
                raise AdapterNotFound(f"unknown adapter {version!r}: this replica has no adapter store")
            start = time.perf_counter()
            try:
                verified = self.store.verify(version, expected_base_model_id=self.base_model_id)
            except AdapterStoreError as exc:
                raise AdapterNotFound(str(exc)) from exc
            self._inject(version, str(verified.path))
            return self._loaded(version, start)

    def load_folder(self, name: str, path: str | os.PathLike[str]) -> float:
        """Load the PEFT folder `path` as adapter `name`, bypassing the store; return the load time.

        For adapters that are not published yet: the trainer's REC gate scores a candidate before
        publication, because its metrics go into the manifest the publication writes. Serving never
        calls this (requests only reach verified store versions). `name` must not be resident already,
        nor "" / "base" / an alias, so it can never shadow a published version or the base.
        """
        with self.lock:
            if name in (BASE, "base") or name in self.aliases or name in self.resident:
                raise ValueError(f"adapter name {name!r} is taken (base, an alias, or resident)")
            start = time.perf_counter()
            self._inject(name, os.fspath(path))
            return self._loaded(name, start)

    def _loaded(self, version: str, start: float) -> float:
        """Record a just-injected adapter (stats, revision) and evict beyond the limit."""
        seconds = time.perf_counter() - start
        self.resident[version] = AdapterStats(load_seconds=seconds)
        self.revision += 1
        self._evict(keep=version)
        return seconds

    def _inject(self, version: str, path: str) -> None:
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=version)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=version)
        self.model.eval()

    def _evict(self, keep: str) -> None:
        """Unload least-recently-used versions beyond the limit, never `keep` or an aliased one."""
        pinned = {*self.aliases.values(), keep}
        for version in list(self.resident):
            if len(self.resident) <= self.max_resident:
                return
            if version not in pinned:
                self._unload(version)

    def _unload(self, version: str) -> None:
        del self.resident[version]
        self.revision += 1
        if version in self.model.peft_config:
            if self.model.active_adapter == version:
                # PEFT refuses to delete the active adapter; park on any other resident one first.
                others = [v for v in self.model.peft_config if v != version]
                if others:
                    self.model.set_adapter(others[0])
            self.model.delete_adapter(version)

    # -- aliases ----------------------------------------------------------------------------
    def set_alias(self, alias: str, version: str) -> None:
        """Point `alias` at `version`, loading it first so the switch is atomic for requests."""
        with self.lock:
            if version != BASE:
                self.load(version)
            if self.aliases.get(alias) != version:
                self.aliases[alias] = version
                self.revision += 1

    # -- generation -------------------------------------------------------------------------
    @contextmanager
    def active(self, version: str) -> Iterator[Any]:
        """Hold the lock and yield the model with `version` active (the base with adapters disabled)."""
        with self.lock:
            if version == BASE:
                if isinstance(self.model, PeftModel):
                    with self.model.disable_adapter():
                        yield self.model
                else:
                    yield self.model
                return
            if version not in self.resident:
                self.load(version)
            self.model.set_adapter(version)
            self.resident.move_to_end(version)
            yield self.model

    def count_request(self, version: str, n: int = 1) -> None:
        with self.lock:
            if version in self.resident:
                self.resident[version].requests_served += n

    def snapshot(self) -> tuple[dict[str, str], dict[str, AdapterStats]]:
        with self.lock:
            return dict(self.aliases), dict(self.resident)
