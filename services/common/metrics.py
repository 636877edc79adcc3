"""Prometheus metric conventions, the shared metric objects, and the metrics HTTP endpoint.

Naming conventions (checked by :func:`check_metric_name` whenever a metric is made through
:func:`counter`, :func:`gauge` or :func:`histogram`):

* every project metric starts with ``spr_`` and is ``snake_case`` (``[a-z0-9_]``);
* base units, named as the last word: ``_seconds``, ``_bytes``, ``_ratio`` ...; never ``_ms``;
* counters are named WITHOUT ``_total``: prometheus_client appends it on export
  (``spr_errors`` is exported as ``spr_errors_total``);
* label names are ``snake_case``; label values come from small closed sets (method names, status
  codes, error codes, stage names) — never ids, URIs or free text, which would explode cardinality.

gRPC server metrics follow go-grpc-prometheus' names and labels (``grpc_service``, ``grpc_method``,
``grpc_type``, ``grpc_code``) with the ``spr_`` prefix, so existing dashboards translate directly.

The default prometheus_client registry is used on purpose, so that the process and platform
collectors and any library metrics are exported on the same endpoint. Dashboards and alert rules may
only reference series that :func:`exported_series_names` lists.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
import threading
from bisect import bisect_left
from collections import Counter as _Tally
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.metrics import MetricWrapperBase

_LOG = logging.getLogger(__name__)

PREFIX = "spr_"
_NAME_RE = re.compile(r"^spr_[a-z][a-z0-9_]*[a-z0-9]$")
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_FORBIDDEN_SUFFIXES = ("_total", "_ms", "_millis", "_milliseconds", "_count", "_sum", "_bucket")

#: Latency buckets (seconds) from a cheap metadata call up to a multi-sample MLLM generation on CPU.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

_M = TypeVar("_M", bound=MetricWrapperBase)
_catalog: dict[str, MetricWrapperBase] = {}
_catalog_lock = threading.Lock()


def check_metric_name(name: str, labelnames: Sequence[str] = ()) -> None:
    """Raise ValueError when ``name`` or a label breaks the project's naming conventions."""
    if not _NAME_RE.match(name) or "__" in name:
        raise ValueError(
            f"metric name {name!r} must match {_NAME_RE.pattern} (prefix {PREFIX!r}, snake_case)"
        )
    if name.endswith(_FORBIDDEN_SUFFIXES):
        raise ValueError(
            f"metric name {name!r} must not end with one of {_FORBIDDEN_SUFFIXES}: counters get _total "
            "on export, histograms get _bucket/_sum/_count, and durations are in _seconds"
        )
    for label in labelnames:
        if not _LABEL_RE.match(label) or label.startswith("__"):
            raise ValueError(f"label {label!r} of {name!r} must be snake_case")


def _define(cls: type[_M], name: str, documentation: str, labelnames: Sequence[str], **kwargs: Any) -> _M:
    """Create (or return the already-created) metric; idempotent so that re-imports do not fail."""
    check_metric_name(name, labelnames)
    with _catalog_lock:
        existing = _catalog.get(name)
        if existing is not None:
            if type(existing) is not cls or tuple(existing._labelnames) != tuple(labelnames):
                raise ValueError(f"metric {name!r} already defined with another type or labels")
            return existing
        metric = cls(name, documentation, labelnames=tuple(labelnames), **kwargs)
        _catalog[name] = metric
        return metric


def counter(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
    """A project counter (exported with ``_total``); see the module docstring for conventions."""
    return _define(Counter, name, documentation, labelnames)


def gauge(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
    """A project gauge."""
    return _define(Gauge, name, documentation, labelnames)


def histogram(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    buckets: Sequence[float] = LATENCY_BUCKETS,
) -> Histogram:
    """A project histogram; the default buckets suit latencies in seconds."""
    return _define(Histogram, name, documentation, labelnames, buckets=tuple(buckets))


def info(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Info:
    """A project info metric (exported as ``<name>_info``)."""
    return _define(Info, name, documentation, labelnames)


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe(a)`` for every amount, with one update per bucket touched: a poll's worth of
    observations costs about what one does. Same buckets and count; the sum adds the amounts first.

    Reads prometheus_client's histogram internals; falls back to one ``observe`` each without them.
    """
    if not amounts:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for amount in amounts:
            histogram.observe(amount)
        return
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]
    total.inc(sum(amounts))
    # observe() counts an amount in the first bucket whose bound is >= it (NaN: in none).
    for index, count in _Tally(bisect_left(bounds, a) for a in amounts if a == a).items():
        buckets[index].inc(count)


# --- shared metric objects -------------------------------------------------------------------------

_GRPC_LABELS = ("grpc_service", "grpc_method", "grpc_type")

GRPC_SERVER_STARTED = counter(
    "spr_grpc_server_started", "RPCs started on the server (after routing to a known method).", _GRPC_LABELS
)
GRPC_SERVER_HANDLED = counter(
    "spr_grpc_server_handled",
    "RPCs completed on the server, by gRPC status code.",
    (*_GRPC_LABELS, "grpc_code"),
)
GRPC_SERVER_HANDLING_SECONDS = histogram(
    "spr_grpc_server_handling_seconds",
    "Time from an RPC's arrival (queueing included) to its completion, by gRPC status code.",
    (*_GRPC_LABELS, "grpc_code"),
)
GRPC_SERVER_IN_FLIGHT = gauge(
    "spr_grpc_server_in_flight", "RPCs currently being handled (queued or running).", _GRPC_LABELS
)
ERRORS = counter(
    "spr_errors",
    "Deliberate errors by component and stable error code (see services.common.errors).",
    ("component", "code"),
)
SERVICE_INFO = info("spr_service", "Identity of the running service: name and code version.", ("service",))


# --- metrics endpoint ------------------------------------------------------------------------------

_server_lock = threading.Lock()
_server_port: int | None = None


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` on ``host:port`` once per process; return the bound port.

    The registry is process-wide, so one endpoint per process is enough: later calls (e.g. several
    gRPC servers in one test process) return the port of the first one. ``port=0`` picks a free port.
    """
    global _server_port
    with _server_lock:
        if _server_port is not None:
            if port not in (0, _server_port):
                _LOG.warning("metrics already served on port %d; ignoring request for %d", _server_port, port)
            return _server_port
        try:
            httpd, _thread = start_http_server(port, addr=host)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        _server_port = int(httpd.server_port)
        _LOG.info("serving Prometheus metrics on http://%s:%d/metrics", host, _server_port)
        return _server_port


def metrics_server_port() -> int | None:
    """The port of this process's metrics endpoint, or None when none was started."""
    return _server_port


# --- the list of exported metrics ------------------------------------------------------------------

_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
    "stateset": ("",),
    "enum": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def import_project_modules(packages: Iterable[str] = ("services", "trainer")) -> list[str]:
    """Import every module of ``packages`` so that their module-level metrics get registered.

    Modules named ``__main__`` are skipped (importing them would run a command). Import errors
    propagate: a module that cannot be imported cannot define its metrics either.
    """
    imported: list[str] = []
    for package_name in packages:
        package = importlib.import_module(package_name)
        imported.append(package_name)
        paths = getattr(package, "__path__", None)
        if paths is None:
            continue
        for module in pkgutil.walk_packages(paths, prefix=f"{package_name}."):
            if module.name.rsplit(".", 1)[-1] == "__main__":
                continue
            importlib.import_module(module.name)
            imported.append(module.name)
    return imported


def defined_metric_families(prefix: str | None = PREFIX) -> dict[str, str]:
    """Metric family name -> type for every metric in the default registry (optionally by prefix)."""
    families: dict[str, str] = {}
    for family in REGISTRY.collect():
        if prefix is None or family.name.startswith(prefix):
            families[family.name] = family.type
    return families


def exported_series_names(
    prefix: str | None = PREFIX, import_packages: Iterable[str] | None = None
) -> set[str]:
    """Every series name the ``/metrics`` endpoint can export (``spr_x_total``, ``spr_y_bucket``, ...).

    Pass ``import_packages=("services", "trainer")`` to import the project's modules first, so that
    metrics defined at module level anywhere in the project are included. A dashboard test checks
    that every metric a dashboard or alert rule references is in this set.
    """
    if import_packages is not None:
        import_project_modules(import_packages)
    names: set[str] = set()
    for family, kind in defined_metric_families(prefix).items():
        for suffix in _SERIES_SUFFIXES.get(kind, ("",)):
            names.add(family + suffix)
    return names
