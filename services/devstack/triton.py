"""Run the ``tritonserver`` binary bundled in the ``nvidia-pytriton`` wheel on a model repository.

Layout of the wheel (found through the installed ``pytriton`` package, never a hard-coded path)::

    pytriton/tritonserver/bin/tritonserver                      the server (python backend only)
    pytriton/tritonserver/backends/python/                      libtriton_python.so + utils module
    pytriton/tritonserver/python_backend_stubs/<X.Y>/triton_python_backend_stub
    nvidia_pytriton.libs/                                       bundled shared libraries

Start-up recipe (see SPEC section 5), each step because without it the server or the stub fails:

1. A private backend directory ``<workdir>/backends/python`` holding copies of the python backend and
   of the stub built for *this* interpreter's version; site-packages is never written to.
2. ``LD_LIBRARY_PATH`` = this interpreter's ``LIBDIR`` first (else the stub links the system
   libpython and crashes), then the wheel's bundled libs (the copied backend and stub lose their
   ``$ORIGIN`` rpath).
3. ``PATH`` starts with this interpreter's ``bin``: the stub runs ``python`` from PATH, which decides
   the site-packages a ``model.py`` imports from.

HTTP, gRPC and metrics bind ``127.0.0.1`` on free ports. Readiness is ``/v2/health/ready`` (and, if
asked, each named model's ``/v2/models/<name>/ready``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from services.devstack.process import (
    LOOPBACK,
    ManagedProcess,
    StartupError,
    free_port,
    log_tail,
    port_is_open,
    wait_until,
)

_LOG = logging.getLogger(__name__)

#: Loopback probes must never go through an HTTP proxy taken from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ModelControlMode(str, Enum):
    """Triton's ``--model-control-mode``."""

    NONE = "none"  # load every model of the repository at start, never change
    POLL = "poll"  # rescan the repository periodically
    EXPLICIT = "explicit"  # load/unload through the repository API (hot reload)


@dataclass(frozen=True)
class TritonDist:
    """Where the pieces of the bundled Triton live in the installed wheels."""

    server_binary: Path
    python_backend_dir: Path
    stub: Path
    libs_dir: Path

    @classmethod
    def locate(cls) -> TritonDist:
        """Find the bundled server, backend, stub for this Python version and libraries."""
        # find_spec, not an import: only the bundled binaries are needed, and importing pytriton
        # would pull in its Python client and its own dependency pins (numpy<2, pyzmq, ...).
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("nvidia-pytriton is not installed (pip install -e .[devstack])")
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = cls(
            server_binary=root / "bin" / "tritonserver",
            python_backend_dir=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            # pytriton's own rule: wheel installs keep the libs beside the package (auditwheel).
            libs_dir=root.parent.parent / "nvidia_pytriton.libs",
        )
        dist.check()
        return dist

    def check(self) -> None:
        """Raise FileNotFoundError naming the first missing piece."""
        for path in (self.server_binary, self.python_backend_dir, self.stub, self.libs_dir):
            if not path.exists():
                raise FileNotFoundError(f"nvidia-pytriton install lacks {path}")


def prepare_backends(dist: TritonDist, workdir: Path) -> Path:
    """Build ``<workdir>/backends`` with the python backend and this interpreter's stub; return it."""
    backends = workdir / "backends"
    python_dir = backends / "python"
    if python_dir.exists():
        shutil.rmtree(python_dir)
    shutil.copytree(
        dist.python_backend_dir,
        python_dir,
        ignore=shutil.ignore_patterns("__pycache__", "triton_python_backend_stub"),
    )
    shutil.copy2(dist.stub, python_dir / "triton_python_backend_stub")
    return backends


def server_env(dist: TritonDist, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver``: LIBDIR and bundled libs on the loader path, venv bin on PATH."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    lib_path = [p for p in (libdir, str(dist.libs_dir), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_path)
    # Not .resolve(): a venv's bin/python is a symlink to the base interpreter, and following it
    # would leave the venv and its site-packages.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
    return env


@dataclass
class TritonPorts:
    """The three loopback ports of one server."""

    http: int
    grpc: int
    metrics: int

    @classmethod
    def pick(cls, http: int = 0, grpc: int = 0, metrics: int = 0) -> TritonPorts:
        """The given ports, with free ones for any left at 0 (all distinct)."""
        taken = {http, grpc, metrics} - {0}
        chosen = []
        for wanted in (http, grpc, metrics):
            port = wanted
            while port == 0 or (wanted == 0 and port in taken):
                port = free_port()
            taken.add(port)
            chosen.append(port)
        return cls(http=chosen[0], grpc=chosen[1], metrics=chosen[2])


class TritonServer:
    """One ``tritonserver`` on loopback serving ``model_repository``; start waits for readiness.

    ``models`` (optional) are also waited for, and in EXPLICIT mode loaded at start-up
    (``--load-model``). ``workdir`` holds ``tritonserver.log`` and the private backend directory; when
    omitted a temporary directory is created and removed on ``__exit__``.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        workdir: Path | None = None,
        models: Sequence[str] = (),
        control_mode: ModelControlMode | str = ModelControlMode.NONE,
        startup_timeout: float = 90.0,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        ports: TritonPorts | None = None,
    ) -> None:
        """Prepare paths and ports (free ones unless given); nothing runs until :meth:`start`."""
        self.model_repository = Path(model_repository).resolve()
        self._owns_workdir = workdir is None
        # Absolute: the server runs with the workdir as its cwd and gets paths inside it.
        self.workdir = (Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="spr-triton-"))).resolve()
        self.log_path = self.workdir / "tritonserver.log"
        self.models = list(models)
        self.control_mode = ModelControlMode(control_mode)
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self._fixed_ports = ports is not None
        self.ports = ports or TritonPorts.pick()
        self._process: ManagedProcess | None = None

    @property
    def host(self) -> str:
        """Loopback address of every endpoint."""
        return LOOPBACK

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP/REST endpoint (tritonclient.http style, no scheme)."""
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics URL."""
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        """PID of the server process while it runs."""
        return self._process.pid if self._process else None

    def argv(self, dist: TritonDist, backends: Path) -> list[str]:
        """Command line for the current ports and options."""
        argv = [
            str(dist.server_binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--model-control-mode={self.control_mode.value}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            # A model that fails to load must fail start-up loudly, not leave a half-ready server.
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            "--exit-timeout-secs=10",
        ]
        if self.control_mode is ModelControlMode.EXPLICIT:
            argv += [f"--load-model={name}" for name in self.models]
        return argv + self.extra_args

    def start(self) -> TritonServer:
        """Start the server and block until it (and :attr:`models`) report ready.

        Retried on fresh ports if the process dies early (a port taken after :func:`free_port`).
        """
        if self.is_running():
            return self
        dist = TritonDist.locate()
        backends = prepare_backends(dist, self.workdir)
        env = server_env(dist)
        for attempt in range(3):
            if self._start_once(self.argv(dist, backends), env):
                return self
            if attempt < 2 and not self._fixed_ports and self._ports_were_taken():
                _LOG.warning("tritonserver could not bind its ports; retrying on fresh ones")
                self.ports = TritonPorts.pick()
                continue
            break
        tail = log_tail(self.log_path, 60)
        self.stop()
        raise StartupError(f"tritonserver did not become ready; log {self.log_path}:\n{tail}")

    def _start_once(self, argv: list[str], env: dict[str, str]) -> bool:
        self._process = ManagedProcess(argv, log_path=self.log_path, env=env, cwd=self.workdir)
        started = time.monotonic()
        self._process.start()
        ready = wait_until(self.is_ready, timeout=self.startup_timeout, interval=0.2, alive=self.is_running)
        if ready:
            _LOG.info(
                "tritonserver ready (http %s, grpc %s, pid %s) in %.1fs",
                self.http_url,
                self.grpc_url,
                self.pid,
                time.monotonic() - started,
            )
            return True
        self._process.stop(grace=5.0)
        return False

    def _ports_were_taken(self) -> bool:
        text = log_tail(self.log_path, 30).lower()
        return "address already in use" in text or ("failed to start" in text and "port" in text)

    def is_ready(self) -> bool:
        """True if the server and every model in :attr:`models` answer ready over HTTP."""
        if not port_is_open(self.host, self.ports.http):
            return False
        paths = ["/v2/health/ready", *(f"/v2/models/{name}/ready" for name in self.models)]
        return all(self._http_ok(path) for path in paths)

    def _http_ok(self, path: str) -> bool:
        try:
            with _NO_PROXY.open(f"http://{self.http_url}{path}", timeout=2.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def is_running(self) -> bool:
        """True while the server process we started is alive."""
        return self._process is not None and self._process.is_running()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM by PID (Triton unloads models and stops its stubs), SIGKILL after ``grace``."""
        if self._process is not None:
            self._process.stop(grace=grace)
            self._process = None

    def close(self) -> None:
        """Stop, and remove the working directory if this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TritonServer({self.model_repository}, grpc={self.grpc_url}, pid={self.pid})"
