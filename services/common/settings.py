"""Settings shared by every service: environment variables + an optional config file, validated at start.

Sources, highest priority first:

1. keyword arguments (tests, embedding);
2. environment variables ``SPR_<SERVICE>_<FIELD>``, e.g. ``SPR_DESCRIBER_PORT=50051``; nested models use
   ``__`` (``SPR_DESCRIBER_TRITON__URL``); lists are comma-separated or JSON; an EMPTY variable counts
   as unset (Kubernetes manifests often template empty values);
3. the config file named by ``--config PATH`` or ``SPR_CONFIG_FILE`` (TOML, YAML or JSON, by
   extension). One file can serve the whole stack: each service reads only its own table, named after
   its prefix (``SPR_DESCRIBER_`` -> ``[describer]``) and validated strictly (unknown keys are errors);
   other tables are ignored;
4. field defaults.

The same names configure the one-machine mode and Kubernetes; they are part of the public interface,
so rename nothing. ``settings_help(cls)`` (or ``<service> --help-env``) lists them with their help text.

Kubernetes caveat: for a Service named e.g. ``spr-describer`` Kubernetes injects
``SPR_DESCRIBER_PORT=tcp://10.0.0.1:50051`` into every pod of the namespace (service links), which
collides with our names. Pods must set ``enableServiceLinks: false``; the error message says so.

Secrets (bearer tokens) are ``SecretStr``: they never appear in ``repr``, logs or validation errors.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 images install tomli
    import tomli as tomllib

_LOG = logging.getLogger(__name__)

#: Environment variable naming the config file (shared by all services).
CONFIG_FILE_ENV = "SPR_CONFIG_FILE"
#: Exit status of a service whose configuration is invalid (same as argparse's usage errors).
CONFIG_ERROR_EXIT_CODE = 2

_S = TypeVar("_S", bound="SprSettings")
_config_path: ContextVar[Path | None] = ContextVar("spr_config_path", default=None)
_SECRET_HINTS = ("token", "secret", "password")


class ConfigFileError(ValueError):
    """The config file is missing, unreadable or not valid TOML/YAML/JSON."""


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML, YAML or JSON config file (by extension) into a dict of tables."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: object = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = _load_yaml(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigFileError(
                f"config file {path}: unknown extension {suffix!r} (use .toml, .yaml or .json)"
            )
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigFileError):
            raise
        raise ConfigFileError(f"config file {path} is not valid {suffix[1:].upper()}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a table/mapping at top level")
    return data


def _load_yaml(text: str) -> object:
    """YAML is optional: PyYAML is imported only when a .yaml file is used."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigFileError("YAML config files need PyYAML (pip install pyyaml); or use TOML") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


def active_config_path() -> Path | None:
    """The config file in effect: the one passed to :func:`load_settings`, else ``$SPR_CONFIG_FILE``."""
    explicit = _config_path.get()
    if explicit is not None:
        return explicit
    from_env = os.environ.get(CONFIG_FILE_ENV, "").strip()
    return Path(from_env) if from_env else None


class ConfigFileSource(PydanticBaseSettingsSource):
    """Settings source reading this service's table from the active config file."""

    def __init__(self, settings_cls: type[SprSettings]) -> None:
        super().__init__(settings_cls)
        path = active_config_path()
        self._data: dict[str, Any] = {}
        if path is not None:
            section = settings_cls.section()
            table = read_config_file(path).get(section, {})
            if not isinstance(table, dict):
                raise ConfigFileError(f"config file {path}: [{section}] must be a table")
            self._data = table

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Per-field lookup (unused by ``__call__``, required by the base class)."""
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        # The whole table, unknown keys included, so that extra="forbid" reports typos.
        return dict(self._data)


class SprSettings(BaseSettings):
    """Base of every service's settings: strict, immutable, env prefix ``SPR_<SERVICE>_``.

    Subclasses set ``model_config = SettingsConfigDict(env_prefix="SPR_DESCRIBER_")``; the config
    file table defaults to the prefix without ``SPR_`` in lower case (override ``config_section``).
    """

    model_config = SettingsConfigDict(
        env_prefix="SPR_",
        env_nested_delimiter="__",
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    #: Table of the config file this class reads; None = derived from the env prefix.
    config_section: ClassVar[str | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments > environment > config file > defaults (no .env, no secrets dir)."""
        if not issubclass(settings_cls, SprSettings):  # pragma: no cover - pydantic passes cls itself
            raise TypeError(f"{settings_cls} is not an SprSettings")
        return (init_settings, env_settings, ConfigFileSource(settings_cls))

    @classmethod
    def env_prefix(cls) -> str:
        """The environment prefix, e.g. ``SPR_DESCRIBER_``."""
        return str(cls.model_config.get("env_prefix", "")).upper()

    @classmethod
    def section(cls) -> str:
        """The config file table of this class, e.g. ``describer``."""
        if cls.config_section:
            return cls.config_section
        return cls.env_prefix().removeprefix("SPR_").strip("_").lower() or "spr"

    @classmethod
    def env_var(cls, *path: str) -> str:
        """The environment variable of a (nested) field: ``env_var("port") == "SPR_DESCRIBER_PORT"``."""
        return cls.env_prefix() + "__".join(p.upper() for p in path)


# --- validation errors, readable ------------------------------------------------------------------


def _is_secret(cls: type[SprSettings], field_name: str) -> bool:
    field = cls.model_fields.get(field_name)
    annotation = repr(field.annotation) if field is not None else ""
    return "Secret" in annotation or any(h in field_name.lower() for h in _SECRET_HINTS)


def _origin(cls: type[SprSettings], loc: Sequence[str | int], file_table: Mapping[str, Any]) -> str:
    """Where a bad value came from: the env var if set, else the config file key, else the default."""
    names = [str(p) for p in loc if isinstance(p, str)]
    env_name = cls.env_var(*names) if names else ""
    if env_name and os.environ.get(env_name, "") != "":
        return f"{env_name} (environment)"
    if names and names[0] in file_table:
        return f"{'.'.join(names)} in [{cls.section()}] of {active_config_path()}"
    return f"{env_name or cls.__name__} (default or argument)"


def _hint(value: object) -> str:
    if isinstance(value, str) and value.startswith("tcp://"):
        return (
            "  hint: this looks like a Kubernetes service-link variable; set `enableServiceLinks: false`"
            " in the pod spec"
        )
    return ""


def format_validation_error(cls: type[SprSettings], error: ValidationError) -> str:
    """A multi-line, human-readable report of ``error`` naming the env var or file key of each problem."""
    try:
        path = active_config_path()
        file_table = read_config_file(path).get(cls.section(), {}) if path else {}
    except ConfigFileError:
        file_table = {}
    lines = [f"invalid configuration for {cls.__name__} ({error.error_count()} problem(s)):"]
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        field = str(loc[0]) if loc else ""
        where = _origin(cls, loc, file_table if isinstance(file_table, dict) else {}) if loc else "settings"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, list(cls.model_fields), n=1)
            message = "unknown setting" + (f" (did you mean {close[0]!r}?)" if close else "")
        shown = ""
        if loc and "input" in item and not _is_secret(cls, field) and item["type"] != "missing":
            shown = f" (got {item['input']!r})"
        lines.append(f"  - {where}: {message}{shown}")
        hint = _hint(item.get("input"))
        if hint and not _is_secret(cls, field):
            lines.append(hint)
    return "\n".join(lines)


def _warn_unknown_env(cls: type[SprSettings]) -> None:
    """Warn about ``SPR_<SERVICE>_*`` variables that match no field (typos are otherwise ignored)."""
    prefix = cls.env_prefix()
    if prefix in ("", "SPR_"):
        return
    known = {cls.env_var(name) for name in cls.model_fields}
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith(prefix) or upper in known or upper.split("__")[0] in known:
            continue
        if "_SERVICE_" in upper or "_PORT_" in upper:
            continue  # Kubernetes service-link variables, not ours
        close = difflib.get_close_matches(upper, known, n=1)
        suggestion = f" (did you mean {close[0]}?)" if close else ""
        _LOG.warning("ignoring unknown setting %s%s", name, suggestion)


def settings_help(cls: type[SprSettings]) -> str:
    """Every setting of ``cls``: env var, type, default and description (for ``--help-env`` and docs)."""
    lines = [
        f"{cls.__name__}: env prefix {cls.env_prefix()}, config table [{cls.section()}] in ${CONFIG_FILE_ENV}"
    ]
    for name, field in cls.model_fields.items():
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        if _is_secret(cls, name) and not field.is_required():
            default = "(none)"
        kind = getattr(field.annotation, "__name__", None) or repr(field.annotation)
        lines.append(f"  {cls.env_var(name)}  [{kind}] default {default}")
        if field.description:
            lines.append(f"      {field.description}")
    return "\n".join(lines)


def _parse_args(cls: type[SprSettings], argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Start {cls.__name__}. Configure with environment variables {cls.env_prefix()}* "
        f"and/or a config file (table [{cls.section()}]); the environment wins over the file.",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help=f"config file (default: ${CONFIG_FILE_ENV})"
    )
    parser.add_argument(
        "--help-env", action="store_true", help="list every setting and its env var, then exit"
    )
    return parser.parse_args(list(argv) if argv is not None else [])


def load_settings(cls: type[_S], argv: Sequence[str] | None = None, **overrides: Any) -> _S:
    """Parse ``--config``/``--help-env`` from ``argv``, load and validate ``cls``; exit(2) on bad config.

    ``argv`` None means no command-line arguments (not ``sys.argv``), so that library use and tests
    never pick up the caller's flags; entry points pass ``sys.argv[1:]``.

    The error message goes to stderr and names each offending env var or file key; no traceback.
    """
    args = _parse_args(cls, argv)
    if args.help_env:
        print(settings_help(cls))
        raise SystemExit(0)
    token = _config_path.set(args.config)
    try:
        _warn_unknown_env(cls)
        return cls(**overrides)
    except ValidationError as exc:
        print(format_validation_error(cls, exc), file=sys.stderr)
    except (ConfigFileError, SettingsError) as exc:
        print(f"invalid configuration for {cls.__name__}: {exc}", file=sys.stderr)
    finally:
        _config_path.reset(token)
    raise SystemExit(CONFIG_ERROR_EXIT_CODE)


# --- the gRPC server settings every service inherits ------------------------------------------------

_MiB = 1024 * 1024


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class GrpcServerSettings(SprSettings):
    """Settings of the shared gRPC bootstrap; each service subclasses this with its own prefix/ports."""

    host: str = Field(
        default="127.0.0.1",
        description="Address to bind. Loopback by default (one-machine mode); 0.0.0.0 or [::] in Kubernetes.",
    )
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free port (tests).")
    max_workers: int = Field(
        default=8, ge=1, le=1024, description="Handler threads (concurrent RPCs being run)."
    )
    max_concurrent_rpcs: int | None = Field(
        default=None,
        ge=1,
        description="RPCs admitted at once (running + queued); then RESOURCE_EXHAUSTED; unset = no limit.",
    )
    max_message_bytes: int = Field(
        default=16 * _MiB,
        ge=1024,
        le=2**31 - 1,
        description="Largest request or response message; larger -> RESOURCE_EXHAUSTED.",
    )
    default_deadline_s: float = Field(
        default=60.0,
        gt=0,
        description="Deadline applied to requests that carry none (seen via context.time_remaining()).",
    )
    max_deadline_s: float = Field(default=600.0, gt=0, description="Longest deadline a request may ask for.")
    deadline_policy: Literal["cap", "reject"] = Field(
        default="cap",
        description="A requested deadline above max_deadline_s is capped to it ('cap') or rejected with "
        "INVALID_ARGUMENT ('reject').",
    )
    shutdown_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="On SIGTERM, time health reports NOT_SERVING while still serving, so load balancers "
        "drain first (Kubernetes: ~5 s).",
    )
    grace_period_s: float = Field(
        default=15.0,
        ge=0,
        description="Time in-flight RPCs get to finish after the server stops accepting new ones.",
    )
    max_connection_age_s: float | None = Field(
        default=None,
        gt=0,
        description="Close connections after this age so clients rebalance across replicas (Kubernetes).",
    )
    reflection: bool = Field(default=True, description="Serve gRPC server reflection (grpcurl, grpcui).")
    metrics_enabled: bool = Field(default=True, description="Serve Prometheus metrics over HTTP at /metrics.")
    metrics_host: str = Field(
        default="127.0.0.1", description="Address of the metrics endpoint (0.0.0.0 in Kubernetes)."
    )
    metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="Port of the metrics endpoint; 0 picks a free port."
    )
    tls_cert: FilePath | None = Field(
        default=None, description="PEM server certificate chain; enables TLS with tls_key."
    )
    tls_key: FilePath | None = Field(default=None, description="PEM private key of tls_cert.")
    tls_client_ca: FilePath | None = Field(
        default=None,
        description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).",
    )
    auth_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(),
        description="Accepted bearer tokens, comma-separated. Empty (and no auth_tokens_file) = no auth.",
    )
    auth_tokens_file: FilePath | None = Field(
        default=None,
        description="File of accepted bearer tokens, one per line ('#' comments); e.g. a mounted Secret.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Root log level."
    )

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_consistency(self) -> GrpcServerSettings:
        env = type(self).env_var
        if self.max_deadline_s < self.default_deadline_s:
            raise ValueError(f"{env('max_deadline_s')} must be >= {env('default_deadline_s')}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"{env('tls_cert')} and {env('tls_key')} must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                f"{env('tls_client_ca')} (mutual TLS) needs {env('tls_cert')} and {env('tls_key')}"
            )
        try:
            tokens = self.bearer_tokens()
        except OSError as exc:
            raise ValueError(f"cannot read {env('auth_tokens_file')}: {exc.strerror or exc}") from exc
        for token in tokens:
            if len(token) < 16 or any(ch.isspace() for ch in token):
                raise ValueError(
                    f"bearer tokens ({env('auth_tokens')} / {env('auth_tokens_file')}) must be at least "
                    "16 characters without whitespace"
                )
        return self

    def bearer_tokens(self) -> frozenset[str]:
        """All accepted bearer tokens (from the env/file list and from ``auth_tokens_file``)."""
        tokens = {t.get_secret_value() for t in self.auth_tokens}
        if self.auth_tokens_file is not None:
            lines = self.auth_tokens_file.read_text(encoding="utf-8").splitlines()
            tokens.update(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))
        return frozenset(tokens)

    @property
    def tls_enabled(self) -> bool:
        """True when the server speaks TLS."""
        return self.tls_cert is not None

    @property
    def loopback_only(self) -> bool:
        """True when the server binds a loopback address only."""
        return _is_loopback(self.host)
