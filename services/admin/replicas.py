"""What each policy replica has loaded, read from the Triton custom metrics of ``spr_policy``.

The python model (``services/policy/model_repository/spr_policy/1/model.py``) exports on Triton's
``/metrics``:

* ``spr_policy_adapter_resident{version}`` — 1 while the version is loaded, 0 once evicted;
* ``spr_policy_adapter_alias{alias, version}`` — 1 for the version each alias names on the replica;
* ``spr_policy_adapter_load_seconds{version}`` — how long the load took;
* ``spr_policy_adapter_requests_total{version}`` — requests served (``version="base"`` for the base).

Lines may carry more labels (e.g. Triton's ``model``/``version``); only the ones above are read, and
samples of one version that differ in other labels are merged (requests summed, the longest load).
A replica that cannot be scraped is reported with its error instead of failing the whole listing.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from services.admin import metrics

RESIDENT = "spr_policy_adapter_resident"
ALIAS = "spr_policy_adapter_alias"
LOAD_SECONDS = "spr_policy_adapter_load_seconds"
REQUESTS = "spr_policy_adapter_requests_total"

_MAX_BYTES = 16 * 1024 * 1024  # Triton's page is ~100 kB; anything near this is not a metrics page
# Replicas are on the cluster network: a proxy from the environment would only get in the way.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class ResidentAdapter:
    """A version loaded on a replica."""

    version: str
    load_seconds: float = 0.0
    requests_served: int = 0


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica's adapters and aliases, or why they could not be read."""

    url: str
    loaded: tuple[ResidentAdapter, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass
class _Tally:
    resident: bool = False
    load_seconds: float = 0.0
    requests: float = 0.0


def parse_replica_metrics(text: str) -> tuple[list[ResidentAdapter], dict[str, str]]:
    """Resident adapters (by version) and the alias map from a Prometheus text exposition."""
    tallies: dict[str, _Tally] = {}
    aliases: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            version = sample.labels.get("version")
            if version is None or sample.name not in (RESIDENT, ALIAS, LOAD_SECONDS, REQUESTS):
                continue
            if sample.name == ALIAS:
                if sample.value >= 0.5 and "alias" in sample.labels:
                    aliases[sample.labels["alias"]] = version
                continue
            tally = tallies.setdefault(version, _Tally())
            if sample.name == RESIDENT:
                tally.resident = tally.resident or sample.value >= 0.5
            elif sample.name == LOAD_SECONDS:
                tally.load_seconds = max(tally.load_seconds, sample.value)
            else:
                tally.requests += sample.value
    loaded = [
        ResidentAdapter(version, t.load_seconds, int(t.requests))
        for version, t in sorted(tallies.items())
        if t.resident
    ]
    return loaded, aliases


def scrape_replica(url: str, timeout_s: float) -> ReplicaStatus:
    """Fetch and parse one replica's metrics; failures become ``ReplicaStatus.error``."""
    try:
        with _OPENER.open(url, timeout=timeout_s) as response:
            body = response.read(_MAX_BYTES + 1)
        if len(body) > _MAX_BYTES:
            raise ValueError(f"metrics page larger than {_MAX_BYTES} bytes")
        loaded, aliases = parse_replica_metrics(body.decode("utf-8", errors="replace"))
    except (OSError, ValueError) as exc:  # URLError/HTTPError/timeouts are OSErrors; bad text ValueError
        metrics.REPLICA_SCRAPES.labels("error").inc()
        return ReplicaStatus(url=url, error=f"{type(exc).__name__}: {exc}")
    metrics.REPLICA_SCRAPES.labels("ok").inc()
    return ReplicaStatus(url=url, loaded=tuple(loaded), aliases=aliases)


def scrape_replicas(urls: Sequence[str], timeout_s: float) -> list[ReplicaStatus]:
    """Every replica, in parallel so that one slow replica costs one timeout, not one each."""
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(urls)), thread_name_prefix="admin-scrape") as pool:
        return list(pool.map(lambda url: scrape_replica(url, timeout_s), urls))


def merge_loaded(replicas: Iterable[ReplicaStatus]) -> list[ResidentAdapter]:
    """One entry per version resident anywhere: requests summed, the longest load time."""
    merged: dict[str, ResidentAdapter] = {}
    for replica in replicas:
        for adapter in replica.loaded:
            seen = merged.get(adapter.version)
            if seen is not None:
                adapter = ResidentAdapter(
                    adapter.version,
                    max(seen.load_seconds, adapter.load_seconds),
                    seen.requests_served + adapter.requests_served,
                )
            merged[adapter.version] = adapter
    return [merged[version] for version in sorted(merged)]
