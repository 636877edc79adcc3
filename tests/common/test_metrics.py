"""Metric naming conventions and the list of exported series that dashboards may reference."""

from __future__ import annotations

import pytest

from services.common import metrics


@pytest.mark.parametrize(
    "name",
    [
        "grpc_requests",  # no spr_ prefix
        "spr_Requests",  # not snake_case
        "spr_requests_total",  # _total is added on export
        "spr_latency_ms",  # base units only
        "spr_double__underscore",
        "spr_trailing_",
    ],
)
def test_bad_metric_names_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        metrics.check_metric_name(name)


def test_bad_label_rejected() -> None:
    with pytest.raises(ValueError):
        metrics.check_metric_name("spr_things", ["Bad-Label"])


def test_definitions_are_idempotent_but_not_conflicting() -> None:
    first = metrics.counter("spr_test_widgets", "Widgets made in a test.", ["kind"])
    assert metrics.counter("spr_test_widgets", "Widgets made in a test.", ["kind"]) is first
    with pytest.raises(ValueError):
        metrics.gauge("spr_test_widgets", "Same name, other type.")
    with pytest.raises(ValueError):
        metrics.counter("spr_test_widgets", "Same name, other labels.", ["colour"])


def test_exported_series_names() -> None:
    names = metrics.exported_series_names(import_packages=("services.common",))
    expected = {
        "spr_grpc_server_started_total",
        "spr_grpc_server_handled_total",
        "spr_grpc_server_handling_seconds_bucket",
        "spr_grpc_server_handling_seconds_count",
        "spr_grpc_server_in_flight",
        "spr_errors_total",
        "spr_service_info",
    }
    assert expected <= names
    assert all(name.startswith("spr_") for name in names)
    everything = metrics.exported_series_names(prefix=None)
    assert "process_cpu_seconds_total" in everything or "python_info" in everything


def test_import_project_modules_skips_main() -> None:
    imported = metrics.import_project_modules(("services.common",))
    assert "services.common.grpc_server" in imported
    assert not any(name.endswith("__main__") for name in imported)


def test_observe_many_counts_as_observing_one_at_a_time() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    buckets = (0.0, 0.1, 0.5, 1.0, 3.0)
    one = Histogram("one", "one at a time", buckets=buckets, registry=registry)
    many = Histogram("many", "all at once", buckets=buckets, registry=registry)
    amounts = [-1.0, 0.0, 0.05, 0.1, 0.1000001, 0.5, 0.7, 1.0, 2.9, 3.0, 3.5, float("inf"), float("nan")]
    for amount in amounts:
        one.observe(amount)
    metrics.observe_many(many, amounts)
    metrics.observe_many(many, [])

    def samples(name: str) -> dict[str, float]:
        (family,) = [f for f in registry.collect() if f.name == name]
        return {
            f"{s.name.removeprefix(name)}{s.labels}": s.value
            for s in family.samples
            if "_created" not in s.name
        }

    got, expected = samples("many"), samples("one")
    assert {k: v for k, v in got.items() if "_sum" not in k} == {
        k: v for k, v in expected.items() if "_sum" not in k
    }
