"""Admin settings: ports, environment variables, stage declarations."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.admin.settings import DEFAULT_STAGES, AdminSettings, StageSpec
from services.common.settings import load_settings


def test_defaults() -> None:
    settings = AdminSettings()
    assert (settings.port, settings.metrics_port) == (50071, 9471)
    assert settings.gated_aliases == ("stable",)
    assert set(settings.eval_gate_tolerances) == {"eval_preference_accuracy", "eval_reward_margin"}
    describer = next(s for s in DEFAULT_STAGES if s.stage == "describer")
    assert (describer.group_id, describer.topics, describer.dead_letter_topics) == (
        "spr-describer",
        ("regions",),
        ("regions.dlq",),
    )
    assert settings.kafka().api_version is None


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPR_ADMIN_REPLICA_METRICS_URLS", "http://a:8002/metrics, http://b:8002/metrics")
    monkeypatch.setenv("SPR_ADMIN_API_VERSION", "2.0")
    monkeypatch.setenv("SPR_ADMIN_EVAL_GATE_TOLERANCES", '{"eval_preference_accuracy": 0.02}')
    monkeypatch.setenv(
        "SPR_ADMIN_STAGES", '[{"stage": "pairs", "group_id": "g", "topics": ["scores.a", "scores.b"]}]'
    )
    settings = load_settings(AdminSettings)
    assert settings.replica_metrics_urls == ("http://a:8002/metrics", "http://b:8002/metrics")
    assert settings.kafka().api_version == (2, 0)
    assert settings.eval_gate_tolerances == {"eval_preference_accuracy": 0.02}
    assert settings.stages == (
        StageSpec(
            stage="pairs",
            group_id="g",
            topics=("scores.a", "scores.b"),
            dead_letter_topics=("scores.a.dlq", "scores.b.dlq"),
        ),
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"replica_metrics_urls": ("triton:8002/metrics",)},
        {"eval_gate_tolerances": {"eval_preference_accuracy": -0.1}},
        {"stages": ({"stage": "x", "group_id": "g", "topics": []},)},
    ],
)
def test_invalid_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AdminSettings(**overrides)  # type: ignore[arg-type]


def test_the_service_does_not_load_torch() -> None:
    """The admin reads topics and files; importing the policy stack would cost seconds and memory."""
    code = "import sys, services.admin.servicer, services.admin.__main__; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
