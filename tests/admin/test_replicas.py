"""Reading what a policy replica has loaded from its Triton metrics page."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.admin.replicas import (
    ReplicaStatus,
    ResidentAdapter,
    merge_loaded,
    parse_replica_metrics,
    scrape_replicas,
)
from services.devstack.process import free_port

# What Triton's /metrics looks like with spr_policy loaded: its own nv_* families (labelled with the
# Triton model and model version), then the python model's custom families. One evicted version
# (resident 0) keeps its load time and request count; "base" counts base-model requests only.
TRITON_SAMPLE = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="spr_policy",version="1"} 12
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.25
# HELP spr_policy_adapter_resident 1 while a version is loaded
# TYPE spr_policy_adapter_resident gauge
spr_policy_adapter_resident{version="spr-v1-aaaaaaaa"} 0
spr_policy_adapter_resident{version="spr-v2-bbbbbbbb"} 1
spr_policy_adapter_resident{version="spr-v3-cccccccc"} 1
# HELP spr_policy_adapter_alias 1 for the version an alias names
# TYPE spr_policy_adapter_alias gauge
spr_policy_adapter_alias{alias="latest",version="spr-v3-cccccccc"} 1
spr_policy_adapter_alias{alias="latest",version="spr-v2-bbbbbbbb"} 0
spr_policy_adapter_alias{alias="stable",version="spr-v2-bbbbbbbb"} 1
# HELP spr_policy_adapter_load_seconds adapter load time
# TYPE spr_policy_adapter_load_seconds gauge
spr_policy_adapter_load_seconds{version="spr-v1-aaaaaaaa"} 0.2
spr_policy_adapter_load_seconds{version="spr-v2-bbbbbbbb"} 0.31
spr_policy_adapter_load_seconds{version="spr-v3-cccccccc",model="spr_policy"} 0.45
# HELP spr_policy_adapter_requests_total requests per adapter
# TYPE spr_policy_adapter_requests_total counter
spr_policy_adapter_requests_total{version="base"} 7
spr_policy_adapter_requests_total{version="spr-v1-aaaaaaaa"} 2
spr_policy_adapter_requests_total{version="spr-v2-bbbbbbbb"} 3
spr_policy_adapter_requests_total{model="spr_policy",version="spr-v3-cccccccc",instance="0"} 4
spr_policy_adapter_requests_total{model="spr_policy",version="spr-v3-cccccccc",instance="1"} 1
"""


def test_parses_resident_adapters_and_aliases_from_triton_metrics() -> None:
    loaded, aliases = parse_replica_metrics(TRITON_SAMPLE)
    assert loaded == [
        ResidentAdapter("spr-v2-bbbbbbbb", load_seconds=0.31, requests_served=3),
        ResidentAdapter("spr-v3-cccccccc", load_seconds=0.45, requests_served=5),  # instances summed
    ]
    assert aliases == {"latest": "spr-v3-cccccccc", "stable": "spr-v2-bbbbbbbb"}


def test_a_replica_without_adapters_or_policy_metrics_reports_nothing_loaded() -> None:
    assert parse_replica_metrics("nv_cpu_utilization 0.5\n") == ([], {})
    assert parse_replica_metrics("") == ([], {})


def test_merging_replicas_sums_requests_and_keeps_the_slowest_load() -> None:
    a = ReplicaStatus("a", loaded=(ResidentAdapter("v1", 0.2, 3), ResidentAdapter("v2", 0.5, 1)))
    b = ReplicaStatus("b", loaded=(ResidentAdapter("v1", 0.4, 2),))
    down = ReplicaStatus("c", error="URLError: refused")
    assert merge_loaded([a, b, down]) == [ResidentAdapter("v1", 0.4, 5), ResidentAdapter("v2", 0.5, 1)]


class _MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = TRITON_SAMPLE.encode()
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def fake_replica() -> Iterator[str]:
    """A loopback HTTP server answering /metrics with TRITON_SAMPLE; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MetricsHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def test_scrape_reports_each_replica_and_the_errors_of_unreachable_ones(fake_replica: str) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/metrics"
    missing_page = fake_replica.replace("/metrics", "/nothing")
    ok, down, not_found = scrape_replicas([fake_replica, unreachable, missing_page], timeout_s=2.0)
    assert ok.error == "" and [a.version for a in ok.loaded] == ["spr-v2-bbbbbbbb", "spr-v3-cccccccc"]
    assert ok.aliases["stable"] == "spr-v2-bbbbbbbb"
    assert down.url == unreachable and down.loaded == () and "URLError" in down.error
    assert "404" in not_found.error
