"""Every metric the Grafana dashboard and the alert rules use is one that something exports.

Each expression is parsed as PromQL (promql_names.py, run by the tools venv): a syntax error fails,
and the metrics are the expression's vector selectors.
``spr_*`` names must be exported by the code: the prometheus_client registry after importing every
module of services/ and trainer/, plus the custom metrics the Triton python model registers through
``pb_utils.MetricFamily`` (read from its source: that module only imports inside Triton). The other
names are external and listed below with their source.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from services.common.metrics import exported_series_names
from tests.deploy.manifests import K8S, REPO, load_yaml, run_tool

DASHBOARD = K8S / "base" / "monitoring" / "spr-dashboard.json"
ALERTS = K8S / "base" / "monitoring" / "alerts.yaml"
POLICY_MODEL = REPO / "services/policy/model_repository/spr_policy/1/model.py"

#: Triton's own metrics (Triton Inference Server docs, "Metrics", 2.51): inference counters and
#: cumulative durations per model, and GPU gauges per device.
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
}
#: Strimzi's Kafka Exporter (kafkaExporter in kafka.yaml).
KAFKA_EXPORTER_METRICS = {"kafka_consumergroup_lag", "kafka_consumergroup_current_offset"}
PROMQL_NAMES = Path(__file__).with_name("promql_names.py")
#: Grafana's label_values(metric, label) variable queries (not PromQL).
LABEL_VALUES_RE = re.compile(r"^label_values\((\w+),\s*\w+\)$")


def _dashboard_exprs() -> Iterator[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


def _alert_exprs() -> Iterator[str]:
    for rule_file in load_yaml(ALERTS):
        for group in rule_file["spec"]["groups"]:
            for rule in group["rules"]:
                yield rule["expr"]


def _triton_model_metrics() -> set[str]:
    """Names passed to pb_utils.MetricFamily(...) in the policy model (exported by Triton as given)."""
    names = set()
    for node in ast.walk(ast.parse(POLICY_MODEL.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "MetricFamily" and node.args:
            names.add(ast.literal_eval(node.args[0]))
    return names


def _variable_metrics() -> Iterator[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            match = LABEL_VALUES_RE.match(query["query"])
            assert match, f"unexpected variable query {query['query']}"
            yield match.group(1)


def _referenced(exprs: Iterable[str]) -> dict[str, str]:
    """Metric name -> an expression selecting it; every expression must parse and select a metric."""
    result = run_tool("python", PROMQL_NAMES, stdin=json.dumps(list(exprs)))
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert parsed["errors"] == {}, "PromQL syntax errors:\n" + "\n".join(
        f"  {message}: {expr}" for expr, message in parsed["errors"].items()
    )
    found: dict[str, str] = {}
    for expr, names in parsed["names"].items():
        assert names, f"expression selects no metric: {expr}"
        found.update({name: expr for name in names})
    return found


def test_dashboard_and_alerts_reference_only_exported_metrics() -> None:
    exported = exported_series_names(import_packages=("services", "trainer"))
    policy = _triton_model_metrics()
    assert {"spr_policy_adapter_alias", "spr_policy_adapter_resident"} <= policy
    known = exported | policy | TRITON_METRICS | KAFKA_EXPORTER_METRICS
    referenced = _referenced([*_dashboard_exprs(), *_alert_exprs()])
    referenced.update({name: "dashboard variable" for name in _variable_metrics()})
    missing = {name: expr for name, expr in referenced.items() if name not in known}
    assert missing == {}, "metrics no code exports (renamed? counters end in _total):\n" + "\n".join(
        f"  {name} in {expr}" for name, expr in missing.items()
    )


def test_dashboard_covers_the_pipeline() -> None:
    referenced = set(_referenced(_dashboard_exprs()))
    for required in (
        "spr_stage_records_total",
        "spr_stage_consumer_lag_records",
        "spr_localization_s_loc_bucket",
        "spr_semantic_s_sem_bucket",
        "spr_pairs_decisions_total",
        "spr_trainer_loss",
        "spr_policy_adapter_alias",
        "nv_inference_request_success",
    ):
        assert required in referenced, required
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "Grafana needs unique panel ids"


def test_a_promql_syntax_error_and_an_unknown_metric_are_caught() -> None:
    result = run_tool("python", PROMQL_NAMES, stdin=json.dumps(["sum(rate(spr_x_total[5m])", "up"]))
    parsed = json.loads(result.stdout)
    assert "unclosed left parenthesis" in parsed["errors"]["sum(rate(spr_x_total[5m])"]
    assert parsed["names"] == {"up": ["up"]}


def test_alerts_cover_lag_dead_letters_adapters_and_serving() -> None:
    alerts = {
        rule["alert"]
        for doc in load_yaml(ALERTS)
        for group in doc["spec"]["groups"]
        for rule in group["rules"]
    }
    assert {
        "SprConsumerLagGrowing",
        "SprDeadLetterRateHigh",
        "SprNoNewAdapter",
        "SprGrpcServerErrors",
    } <= alerts
