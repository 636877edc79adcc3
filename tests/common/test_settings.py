"""Settings: env vars over the config file over defaults, and readable validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from services.common.images import ImageLimits
from services.common.settings import (
    CONFIG_ERROR_EXIT_CODE,
    GrpcServerSettings,
    format_validation_error,
    load_settings,
    settings_help,
)

SECRET = "very-secret-token-value-1234"


class DemoSettings(GrpcServerSettings):
    """A service as every real one declares it: its own prefix, its own default port."""

    model_config = SettingsConfigDict(env_prefix="SPR_DEMO_")
    port: int = 50999
    images: ImageLimits = ImageLimits()


def _toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "spr.toml"
    path.write_text(body)
    return path


def test_prefix_section_and_env_names() -> None:
    assert DemoSettings.env_prefix() == "SPR_DEMO_"
    assert DemoSettings.section() == "demo"
    assert DemoSettings.env_var("metrics_port") == "SPR_DEMO_METRICS_PORT"
    assert DemoSettings().port == 50999


def test_env_overrides_file_overrides_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _toml(tmp_path, "[demo]\nport = 1111\nmax_workers = 3\n\n[other_service]\nport = 7\n")
    monkeypatch.setenv("SPR_CONFIG_FILE", str(config))
    monkeypatch.setenv("SPR_DEMO_PORT", "2222")
    settings = DemoSettings()
    assert settings.port == 2222  # env wins
    assert settings.max_workers == 3  # from the file
    assert settings.max_message_bytes == 16 * 1024 * 1024  # default
    assert settings.host == "127.0.0.1"  # loopback by default


def test_nested_settings_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _toml(tmp_path, "[demo.images]\nmax_pixels = 1000\nallow_http = true\n")
    monkeypatch.setenv("SPR_CONFIG_FILE", str(config))
    monkeypatch.setenv("SPR_DEMO_IMAGES__MAX_BYTES", "2048")
    images = DemoSettings().images
    assert (images.max_bytes, images.max_pixels, images.allow_http) == (2048, 1000, True)
    monkeypatch.setenv("SPR_DEMO_IMAGES__MAX_PIXELS", "-5")
    with pytest.raises(ValidationError) as info:
        DemoSettings()
    assert "SPR_DEMO_IMAGES__MAX_PIXELS (environment): Input should be greater than or equal to 1" in (
        format_validation_error(DemoSettings, info.value)
    )


def test_config_flag_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("yaml")
    config = tmp_path / "spr.yaml"
    config.write_text("demo:\n  port: 3333\n  deadline_policy: reject\n")
    settings = load_settings(DemoSettings, ["--config", str(config)])
    assert (settings.port, settings.deadline_policy) == (3333, "reject")
    monkeypatch.setenv("SPR_DEMO_PORT", "4444")
    assert load_settings(DemoSettings, ["--config", str(config)]).port == 4444


def test_empty_env_var_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPR_DEMO_TLS_CERT", "")
    monkeypatch.setenv("SPR_DEMO_PORT", "")
    settings = DemoSettings()
    assert settings.tls_cert is None
    assert settings.port == 50999


def test_readable_validation_error_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _toml(tmp_path, "[demo]\nmax_wrokers = 2\ngrace_period_s = -1\n")
    monkeypatch.setenv("SPR_DEMO_PORT", "not-a-port")
    monkeypatch.setenv("SPR_DEMO_METRICS_PORT", "tcp://10.0.0.7:9464")
    with pytest.raises(SystemExit) as exit_info:
        load_settings(DemoSettings, ["--config", str(config)])
    assert exit_info.value.code == CONFIG_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert "invalid configuration for DemoSettings (4 problem(s))" in err
    assert "SPR_DEMO_PORT (environment): Input should be a valid integer" in err
    assert "(got 'not-a-port')" in err
    assert "enableServiceLinks: false" in err  # the Kubernetes service-link trap is explained
    assert f"max_wrokers in [demo] of {config}: unknown setting (did you mean 'max_workers'?)" in err
    assert f"grace_period_s in [demo] of {config}: Input should be greater than or equal to 0" in err
    assert "Traceback" not in err


def test_cross_field_errors_name_the_env_vars(tmp_path: Path) -> None:
    cert = tmp_path / "server.pem"
    cert.write_text("x")
    with pytest.raises(ValidationError) as info:
        DemoSettings(tls_cert=cert)
    text = format_validation_error(DemoSettings, info.value)
    assert "SPR_DEMO_TLS_CERT and SPR_DEMO_TLS_KEY must be set together" in text
    with pytest.raises(ValidationError) as info:
        DemoSettings(tls_client_ca=cert)
    assert "SPR_DEMO_TLS_CLIENT_CA (mutual TLS) needs SPR_DEMO_TLS_CERT" in format_validation_error(
        DemoSettings, info.value
    )


def test_bearer_tokens_from_env_and_file_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# rotated 2025-01\nfile-token-abcdefghijklmnop\n\n")
    monkeypatch.setenv("SPR_DEMO_AUTH_TOKENS", f"{SECRET}, second-token-abcdefghijkl")
    monkeypatch.setenv("SPR_DEMO_AUTH_TOKENS_FILE", str(tokens_file))
    settings = DemoSettings()
    assert settings.bearer_tokens() == {SECRET, "second-token-abcdefghijkl", "file-token-abcdefghijklmnop"}
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())


def test_weak_token_rejected_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPR_DEMO_AUTH_TOKENS", "short-secret")
    with pytest.raises(SystemExit):
        load_settings(DemoSettings, [])
    err = capsys.readouterr().err
    assert "SPR_DEMO_AUTH_TOKENS" in err
    assert "at least 16 characters" in err
    assert "short-secret" not in err


def test_bad_config_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _toml(tmp_path, "[demo\nport = 1\n")
    with pytest.raises(SystemExit):
        load_settings(DemoSettings, ["--config", str(broken)])
    assert f"config file {broken} is not valid TOML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings(DemoSettings, ["--config", str(tmp_path / "missing.toml")])
    assert "cannot read config file" in capsys.readouterr().err


def test_unknown_env_var_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SPR_DEMO_MAX_WORKER", "4")
    monkeypatch.setenv("SPR_DEMO_SERVICE_HOST", "10.0.0.1")  # a Kubernetes service link: ignored quietly
    load_settings(DemoSettings, [])
    warnings = [r.getMessage() for r in caplog.records]
    assert "ignoring unknown setting SPR_DEMO_MAX_WORKER (did you mean SPR_DEMO_MAX_WORKERS?)" in warnings
    assert not any("SERVICE_HOST" in w for w in warnings)


def test_help_lists_every_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    text = settings_help(DemoSettings)
    for name in DemoSettings.model_fields:
        assert DemoSettings.env_var(name) in text
    assert "Accepted bearer tokens" in text  # descriptions are the help text
    with pytest.raises(SystemExit) as exit_info:
        load_settings(DemoSettings, ["--help-env"])
    assert exit_info.value.code == 0
    assert "SPR_DEMO_PORT" in capsys.readouterr().out
