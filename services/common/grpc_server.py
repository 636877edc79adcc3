"""The one gRPC server bootstrap every service uses, and the matching client channel helper.

:func:`build_server` returns a :class:`GrpcServer` that has

* message size limits (``max_message_bytes``, both directions; beyond -> RESOURCE_EXHAUSTED) and an
  optional admission limit (``max_concurrent_rpcs``);
* the standard health service (``grpc.health.v1.Health``): every registered service and the overall
  status ``""`` turn SERVING after :meth:`GrpcServer.start` and NOT_SERVING when shutdown begins;
* server reflection for the registered services, health and reflection (``reflection=True``);
* Prometheus metrics (:mod:`services.common.metrics`): ``spr_grpc_server_started_total``,
  ``spr_grpc_server_handled_total``, ``spr_grpc_server_handling_seconds`` (arrival to completion,
  queueing included) with labels ``grpc_service``, ``grpc_method``, ``grpc_type``, ``grpc_code``
  (canonical upper-case names such as ``OK``, ``INVALID_ARGUMENT``), ``spr_grpc_server_in_flight``,
  and ``spr_errors_total{component, code}`` for typed errors; served on ``metrics_port``;
* deadlines: a request without a deadline gets ``default_deadline_s``; one asking for more than
  ``max_deadline_s`` is capped to it (``deadline_policy="cap"``, the default) or rejected with
  INVALID_ARGUMENT (``"reject"``). Handlers see the effective deadline through
  ``context.time_remaining()`` and should pass it on as the timeout of downstream calls;
  ``context.is_active()`` turns False once it passes. Python cannot pre-empt a running handler, so
  the deadline is enforced at the edges: a request whose deadline passed while it queued is not run,
  a unary handler that returns late yields DEADLINE_EXCEEDED, a stream stops before its next message;
* errors: a handler raising :class:`~services.common.errors.SprError` gets that error's status, code
  and details; any other exception is logged with a short error id and the client gets INTERNAL
  ("internal error (<ExceptionType>), error id <id>") — exception text is not sent, as it may hold
  paths or secrets. The server keeps serving;
* TLS when ``tls_cert``/``tls_key`` are set, mutual TLS when ``tls_client_ca`` is set too;
* bearer-token auth when tokens are configured: metadata ``authorization: Bearer <token>``, else
  UNAUTHENTICATED. Off by default (loopback, one-machine mode).

Health checks and reflection are exempt from auth, deadlines and metrics: probes (kubelet gRPC probes,
load balancers) carry no token, and their Watch streams must stay non-blocking.

:func:`serve` runs a server until SIGTERM/SIGINT: health -> NOT_SERVING, wait ``shutdown_delay_s`` (so
load balancers stop routing), stop accepting, let in-flight RPCs finish for ``grace_period_s``. A
second signal stops at once.
"""

from __future__ import annotations

import hmac
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics
from services.common.errors import SprError, abort_with_error
from services.common.settings import GrpcServerSettings, load_settings

_LOG = logging.getLogger(__name__)

#: Registers servicers on the server and returns their full service names (e.g. "spr.v1.Admin").
RegisterFn = Callable[[grpc.Server], Iterable[str]]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_S = TypeVar("_S", bound=GrpcServerSettings)

_EXEMPT_SERVICES = frozenset(
    {health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"}
)
# time_remaining() of a call without a deadline is ~9.2e18 s (gpr_inf_future); anything this far
# out is "no deadline".
_NO_DEADLINE_THRESHOLD_S = 1e12
_DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def service_names(*file_modules: Any) -> list[str]:
    """Full names of every service declared in generated ``*_pb2`` modules (for ``register``)."""
    return [svc.full_name for module in file_modules for svc in module.DESCRIPTOR.services_by_name.values()]


def _split_method(full_method: str) -> tuple[str, str]:
    """``"/spr.v1.Admin/Promote"`` -> ``("spr.v1.Admin", "Promote")``."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service, method


def _rpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


# --- per-call context --------------------------------------------------------------------------------


class _CallContext(grpc.ServicerContext):
    """Proxy of the real context: reports the effective deadline and remembers the status code set."""

    def __init__(self, inner: grpc.ServicerContext, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline  # time.monotonic() based
        self.status_code: grpc.StatusCode | None = None
        self.aborted = False

    # deadline-aware
    def time_remaining(self) -> float:
        """Seconds left until the effective deadline (default or capped), never negative."""
        return max(self._deadline - time.monotonic(), 0.0)

    def is_active(self) -> bool:
        """False once the client is gone or the effective deadline passed."""
        return self._inner.is_active() and self.time_remaining() > 0

    def expired(self) -> bool:
        """True once the effective deadline passed."""
        return time.monotonic() >= self._deadline

    # status-recording
    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """Record the code, then abort the real call (raises)."""
        self.status_code, self.aborted = code, True
        self._inner.abort(code, details)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        """Record the code, then abort the real call with ``status`` (raises)."""
        self.status_code, self.aborted = status.code, True
        self._inner.abort_with_status(status)

    def set_code(self, code: grpc.StatusCode) -> None:
        """Record and set the status code of a call that returns normally."""
        self.status_code = code
        self._inner.set_code(code)

    # plain delegation
    def set_details(self, details: str) -> None:
        self._inner.set_details(details)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._inner.add_callback(callback)

    def cancel(self) -> bool:
        return self._inner.cancel()

    def invocation_metadata(self) -> Any:
        return self._inner.invocation_metadata()

    def peer(self) -> str:
        return self._inner.peer()

    def peer_identities(self) -> Iterable[bytes] | None:
        return self._inner.peer_identities()

    def peer_identity_key(self) -> str | None:
        return self._inner.peer_identity_key()

    def auth_context(self) -> Any:
        return self._inner.auth_context()

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._inner.send_initial_metadata(initial_metadata)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._inner.set_trailing_metadata(trailing_metadata)

    def trailing_metadata(self) -> Any:
        return self._inner.trailing_metadata()

    def set_compression(self, compression: grpc.Compression) -> None:
        self._inner.set_compression(compression)

    def disable_next_message_compression(self) -> None:
        self._inner.disable_next_message_compression()

    def code(self) -> Any:
        return self._inner.code()  # type: ignore[attr-defined]  # exists at runtime, not in the stubs

    def details(self) -> Any:
        return self._inner.details()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        # Anything added to grpc's context later (experimental APIs) still reaches the real one.
        if name == "_inner":  # not yet set (during construction): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self._inner, name)


# --- one RPC: deadline admission, metrics, error translation -----------------------------------------


@dataclass(frozen=True)
class _DeadlinePolicy:
    default_s: float
    max_s: float
    reject_above_max: bool

    @classmethod
    def from_settings(cls, settings: GrpcServerSettings) -> _DeadlinePolicy:
        return cls(settings.default_deadline_s, settings.max_deadline_s, settings.deadline_policy == "reject")


class _Call:
    """Bookkeeping of one RPC from arrival to completion."""

    def __init__(self, labels: tuple[str, str, str], arrival: float, policy: _DeadlinePolicy, component: str):
        self.labels = labels
        self.arrival = arrival
        self.policy = policy
        self.component = component
        self._ctx: _CallContext | None = None
        self._requested_s: float | None = None

    def begin(self, inner: grpc.ServicerContext) -> _CallContext:
        """Wrap the context with the effective deadline; count the RPC as started."""
        metrics.GRPC_SERVER_STARTED.labels(*self.labels).inc()
        metrics.GRPC_SERVER_IN_FLIGHT.labels(*self.labels).inc()
        remaining = inner.time_remaining()
        if remaining is None or remaining > _NO_DEADLINE_THRESHOLD_S:
            deadline = self.arrival + self.policy.default_s
        else:
            deadline = min(time.monotonic() + remaining, self.arrival + self.policy.max_s)
        self._requested_s = None if remaining is None or remaining > _NO_DEADLINE_THRESHOLD_S else remaining
        self._ctx = _CallContext(inner, deadline)
        return self._ctx

    def admit(self, ctx: _CallContext) -> None:
        """Refuse to run a request whose deadline is too long (reject policy) or already over."""
        requested = self._requested_s
        if self.policy.reject_above_max and requested is not None and requested > self.policy.max_s + 1.0:
            ctx.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requested deadline {requested:.0f}s exceeds the server maximum of {self.policy.max_s:.0f}s",
            )
        self.check_deadline(ctx)

    def check_deadline(self, ctx: _CallContext) -> None:
        """Abort with DEADLINE_EXCEEDED once the effective deadline passed."""
        if ctx.expired():
            ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded on the server")

    def fail(self, ctx: _CallContext, exc: Exception) -> NoReturn:
        """Turn any exception from the handler into a proper status; always raises."""
        if ctx.aborted:
            raise exc  # the handler (or we) already chose the status
        if isinstance(exc, SprError):
            metrics.ERRORS.labels(self.component, exc.code).inc()
            abort_with_error(ctx, exc)
        error_id = uuid.uuid4().hex[:12]
        _LOG.error(
            "unhandled %s in /%s/%s (error id %s)",
            type(exc).__name__,
            self.labels[0],
            self.labels[1],
            error_id,
            exc_info=exc,
        )
        ctx.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}), error id {error_id}")

    def finish(self, cancelled: bool = False) -> None:
        """Record the outcome: status code, latency, in-flight."""
        ctx = self._ctx
        if ctx is None:
            return
        code = grpc.StatusCode.CANCELLED if cancelled else (ctx.status_code or grpc.StatusCode.OK)
        labels = (*self.labels, code.name)
        metrics.GRPC_SERVER_HANDLED.labels(*labels).inc()
        metrics.GRPC_SERVER_HANDLING_SECONDS.labels(*labels).observe(time.monotonic() - self.arrival)
        metrics.GRPC_SERVER_IN_FLIGHT.labels(*self.labels).dec()


def _observe_unary_response(
    behavior: Callable[[Any, grpc.ServicerContext], Any], new_call: Callable[[], _Call]
) -> Callable[[Any, grpc.ServicerContext], Any]:
    """Wrap a unary-response behavior (unary-unary or stream-unary)."""

    def run(request: Any, context: grpc.ServicerContext) -> Any:
        call = new_call()
        ctx = call.begin(context)
        try:
            call.admit(ctx)
            response = behavior(request, ctx)
            call.check_deadline(ctx)
            return response
        except Exception as exc:
            call.fail(ctx, exc)
        finally:
            call.finish()

    return run


def _observe_stream_response(
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], new_call: Callable[[], _Call]
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    """Wrap a streaming-response behavior (unary-stream or bidi)."""

    def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = new_call()
        ctx = call.begin(context)
        cancelled = False
        try:
            call.admit(ctx)
            for message in behavior(request, ctx):
                call.check_deadline(ctx)
                yield message
        except GeneratorExit:
            cancelled = True  # grpc dropped the iterator: the client went away
            raise
        except Exception as exc:
            call.fail(ctx, exc)
        finally:
            call.finish(cancelled=cancelled)

    return run


def _replace_behavior(
    handler: grpc.RpcMethodHandler[_Req, _Resp],
    unary_response: Callable[[Callable[..., Any]], Callable[..., Any]],
    stream_response: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler[_Req, _Resp]:
    """A handler of the same kind and (de)serializers whose behavior is wrapped."""
    deser, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), deser, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), deser, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), deser, ser)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), deser, ser)
    return handler


class ObservingInterceptor(grpc.ServerInterceptor):
    """Metrics, deadline policy and error translation for every non-exempt RPC."""

    def __init__(self, policy: _DeadlinePolicy, component: str) -> None:
        self._policy = policy
        self._component = component

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[_Req, _Resp] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        """Wrap the handler; unknown methods (None) pass through so that labels stay bounded."""
        # Interceptors run when the call arrives, before it queues for a worker thread.
        arrival = time.monotonic()
        handler = continuation(handler_call_details)
        service, method = _split_method(handler_call_details.method)
        if handler is None or service in _EXEMPT_SERVICES:
            return handler
        labels = (service, method, _rpc_type(handler))

        def new_call() -> _Call:
            return _Call(labels, arrival, self._policy, self._component)

        return _replace_behavior(
            handler,
            lambda b: _observe_unary_response(b, new_call),
            lambda b: _observe_stream_response(b, new_call),
        )


class BearerTokenAuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` with one of the configured tokens (UNAUTHENTICATED)."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens)
        if not self._tokens:
            raise ValueError("BearerTokenAuthInterceptor needs at least one token")

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key != "authorization":
                continue
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, presented = text.partition(" ")
            if scheme.lower() != "bearer":
                return False
            candidate = presented.strip().encode()
            # Compare against every token so that timing reveals neither the token nor which matched.
            return sum(hmac.compare_digest(candidate, t) for t in self._tokens) > 0
        return False

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[_Req, _Resp] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        """Pass authorized calls and exempt services; answer the rest with UNAUTHENTICATED."""
        handler = continuation(handler_call_details)
        service, _ = _split_method(handler_call_details.method)
        if handler is None or service in _EXEMPT_SERVICES:
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler

        def deny(_request: Any, context: grpc.ServicerContext) -> NoReturn:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        return _replace_behavior(handler, lambda _b: deny, lambda _b: deny)


# --- the server ------------------------------------------------------------------------------------------


def server_credentials(settings: GrpcServerSettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the settings; None for plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _server_options(settings: GrpcServerSettings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # grpc enables SO_REUSEPORT by default, so a second server on a busy port "starts" and
        # silently shares traffic; fail loudly instead.
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(settings.grace_period_s * 1000)))
    return options


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


class GrpcServer:
    """A configured gRPC server with health, reflection, metrics; see the module docstring."""

    def __init__(
        self,
        settings: GrpcServerSettings,
        server: grpc.Server,
        health_servicer: health.HealthServicer,
        service_names: Sequence[str],
        port: int,
        component: str,
    ) -> None:
        self.settings = settings
        self.server = server
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self.port = port
        self.component = component
        self.metrics_port: int | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._skip_delay = threading.Event()
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        """``host:port`` clients can dial (the bound port, also when 0 was configured)."""
        return _bind_address(self.settings.host, self.port)

    def start(self, *, serving: bool = True) -> None:
        """Start serving; with ``serving=False`` health stays NOT_SERVING until :meth:`set_serving`."""
        if self.settings.metrics_enabled:
            self.metrics_port = metrics.start_metrics_server(
                self.settings.metrics_port, self.settings.metrics_host
            )
        metrics.SERVICE_INFO.labels(self.component).info({"version": _code_version()})
        self.server.start()
        self.set_serving(serving)
        _LOG.info(
            "%s serving %s on %s (tls=%s, auth=%s)",
            self.component,
            ", ".join(self.service_names) or "(no services)",
            self.address,
            self.settings.tls_enabled,
            bool(self.settings.bearer_tokens()),
        )

    def set_serving(self, serving: bool, service: str | None = None) -> None:
        """Set health of one service, or of all of them and the overall status ("")."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        targets = (service,) if service is not None else (health.OVERALL_HEALTH, *self.service_names)
        for name in targets:
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, ``shutdown_delay_s``, stop accepting, drain ``grace`` seconds.

        Thread-safe and idempotent; a second call while stopping shortens the wait (a smaller grace
        takes effect) and returns at once.
        """
        grace = self.settings.grace_period_s if grace is None else grace
        with self._lock:
            already, self._stopping = self._stopping, True
        if already:
            self._skip_delay.set()
            self.server.stop(grace)
            return
        _LOG.info(
            "%s shutting down (delay %.1fs, grace %.1fs)",
            self.component,
            self.settings.shutdown_delay_s,
            grace,
        )
        self.health.enter_graceful_shutdown()
        self._skip_delay.wait(self.settings.shutdown_delay_s)
        self.server.stop(grace).wait()
        self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` completed (True) or ``timeout`` passed (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> GrpcServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(grace=0)


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spr-online")
    except PackageNotFoundError:
        return "unknown"


def build_server(
    settings: GrpcServerSettings,
    register: RegisterFn,
    *,
    component: str | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> GrpcServer:
    """Create (not start) the server: register services, health, reflection, interceptors, bind the port.

    ``register`` adds the servicers and returns their full names (:func:`service_names` helps);
    ``component`` names the service in logs and metrics (default: the settings' config section);
    extra ``interceptors`` run inside the built-in ones.
    """
    component = component or settings.section()
    chain: list[grpc.ServerInterceptor] = [
        ObservingInterceptor(_DeadlinePolicy.from_settings(settings), component)
    ]
    tokens = settings.bearer_tokens()
    if tokens:
        chain.append(BearerTokenAuthInterceptor(tokens))
    chain.extend(interceptors)
    pool = futures.ThreadPoolExecutor(
        max_workers=settings.max_workers, thread_name_prefix=f"grpc-{component}"
    )
    server = grpc.server(
        pool,
        interceptors=chain,
        options=_server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    names = list(register(server))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (health.OVERALL_HEALTH, *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if settings.reflection:
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, settings)
    _warn_insecure(settings, bool(tokens))
    return GrpcServer(settings, server, health_servicer, names, port, component)


def _bind(server: grpc.Server, settings: GrpcServerSettings) -> int:
    address = _bind_address(settings.host, settings.port)
    credentials = server_credentials(settings)
    try:
        port = (
            server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        port, cause = 0, f": {exc}"
    else:
        cause = ""
    if port == 0:
        raise OSError(
            f"cannot bind gRPC server to {address}{cause} (port in use or address not local?); "
            f"set {settings.env_var('host')} / {settings.env_var('port')}"
        )
    return port


def _warn_insecure(settings: GrpcServerSettings, auth: bool) -> None:
    if settings.loopback_only or settings.tls_enabled:
        return
    if auth:
        _LOG.warning("bearer tokens travel in cleartext: %s is not loopback and TLS is off", settings.host)
    else:
        _LOG.info(
            "serving plaintext without auth on %s (fine behind a mesh or on a private network)", settings.host
        )


def serve(
    settings: GrpcServerSettings,
    register: RegisterFn,
    *,
    component: str | None = None,
    ready: Callable[[GrpcServer], None] | None = None,
) -> None:
    """Build, start and run the server until SIGTERM/SIGINT, then stop gracefully.

    ``ready`` is called with the started server (e.g. to start a Kafka stage, or to report the port).
    Signal handlers are installed only in the main thread; elsewhere, stop the server yourself.
    """
    server = build_server(settings, register, component=component)
    server.start()
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop_requested.is_set():
            _LOG.warning("second %s: stopping now", signal.Signals(signum).name)
            # grpc's stop is not safe to re-enter from a signal handler; use a thread.
            threading.Thread(target=server.stop, args=(0,), daemon=True).start()
            return
        _LOG.info("%s received: shutting down", signal.Signals(signum).name)
        stop_requested.set()

    previous = _install_signal_handlers(on_signal)
    try:
        if ready is not None:
            ready(server)
        stop_requested.wait()
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _install_signal_handlers(handler: Callable[[int, FrameType | None], None]) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    return previous


def run_service(
    settings_cls: type[_S],
    make_register: Callable[[_S], RegisterFn],
    argv: Sequence[str] | None = None,
) -> None:
    """Entry point of a service: load settings (exit 2 if invalid), set up logging, :func:`serve`.

    ``argv`` defaults to ``sys.argv[1:]`` (``--config PATH``, ``--help-env``).
    """
    settings = load_settings(settings_cls, sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    serve(settings, make_register(settings))


# --- client side -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _BearerTokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (works on plaintext channels too)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            (*tuple(details.metadata or ()), self._header),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes from bytes, or from a file path (str or Path)."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def make_channel(
    target: str,
    *,
    tls: bool = False,
    ca_cert: bytes | str | Path | None = None,
    client_cert: bytes | str | Path | None = None,
    client_key: bytes | str | Path | None = None,
    token: str | None = None,
    max_message_bytes: int = _DEFAULT_MAX_MESSAGE_BYTES,
    server_name_override: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A client channel matching :func:`build_server`'s options.

    TLS is on when ``tls`` is True or any certificate is given; ``ca_cert`` None uses the system roots.
    ``client_cert``/``client_key`` enable mutual TLS. ``token`` adds the bearer header to every call.
    ``server_name_override`` checks the server certificate against that name instead of the target's
    host (tests, IP targets).
    """
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *options,
    ]
    if server_name_override:
        opts.append(("grpc.ssl_target_name_override", server_name_override))
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key must be given together")
    if tls or ca_cert is not None or client_cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(ca_cert), private_key=_pem(client_key), certificate_chain=_pem(client_cert)
        )
        channel = grpc.secure_channel(target, credentials, options=opts)
    else:
        host = target.rsplit(":", 1)[0].strip("[]")
        if token and host not in ("localhost", "127.0.0.1", "::1"):
            _LOG.warning("sending a bearer token over a plaintext channel to %s", target)
        channel = grpc.insecure_channel(target, options=opts)
    if token:
        channel = grpc.intercept_channel(channel, _BearerTokenClientInterceptor(token))
    return channel


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> int:
    """Client side: the ``HealthCheckResponse.ServingStatus`` of ``service`` ("" = the whole server).

    Raises ``grpc.RpcError`` (NOT_FOUND for an unknown service, UNAVAILABLE when nothing listens).
    """
    check = channel.unary_unary(
        f"/{health.SERVICE_NAME}/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return int(response.status)
