"""Process plumbing shared by the dev-stack launchers: free ports, spawning with a log file, stop by PID.

Every server is started in a session of its own (``start_new_session``) so that signals sent to the
terminal or to the test runner never reach it by accident, and so that its children (the python
backend stubs of ``tritonserver``) can be swept with one ``killpg`` on the id of the process we
started if a graceful stop fails. Nothing here ever signals a process it did not start.

Clean-up does not rely on the caller's ``finally`` blocks alone: ``atexit`` stops what is still
running, and on Linux each server is exec'd through a tiny launcher that asks the kernel to SIGTERM
it when its parent dies (``PR_SET_PDEATHSIG``), so even a SIGKILLed test runner leaks no broker.
The kernel ties that signal to the *thread* that spawned the server: start servers from a thread
that outlives them (normally the main thread).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: Every dev-stack server binds loopback only.
LOOPBACK = "127.0.0.1"


#: Runs as ``python -c LAUNCHER <parent pid> <argv...>``: arm the parent-death signal, then exec the
#: server in place (same PID). The getppid check closes the race with a parent that already died.
_PDEATHSIG_LAUNCHER = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    """Wrap ``argv`` in the launcher on Linux; elsewhere run it as is."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-c", _PDEATHSIG_LAUNCHER, str(os.getpid()), *argv]


#: Processes started and not yet stopped; swept at interpreter exit so a crashed caller leaks nothing.
_LIVE: set[ManagedProcess] = set()


@atexit.register
def _stop_all_at_exit() -> None:
    for process in list(_LIVE):
        process.stop(grace=5.0)


class StartupError(RuntimeError):
    """A server did not become ready; the message carries the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` right now (the kernel picks it).

    There is an unavoidable window between closing this probe socket and the server binding the
    port; launchers therefore retry start-up with a fresh port when the server dies early.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """True if ``pid`` names a live, non-zombie process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no procfs (macOS): kill(0) is all we know
    return "State:\tZ" not in status


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.1,
    alive: Callable[[], bool] | None = None,
) -> bool:
    """Poll ``predicate`` until it is true (True), the deadline passes or ``alive()`` turns false (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if alive is not None and not alive():
            return False
        time.sleep(interval)
    return predicate()


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist yet)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One child process whose stdout and stderr go to a log file, stopped by its own PID."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Remember how to start the process; nothing runs until :meth:`start`."""
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running process, None before start and after stop."""
        return self._popen.pid if self._popen is not None else None

    def start(self) -> None:
        """Spawn the process, appending its output to :attr:`log_path` (kept across restarts)."""
        if self.is_running():
            raise RuntimeError(f"already running as pid {self.pid}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                _with_parent_death_signal(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        _LIVE.add(self)

    def is_running(self) -> bool:
        """True while the process we started has not exited."""
        return self._popen is not None and self._popen.poll() is None

    def returncode(self) -> int | None:
        """Exit status once the process has exited, else None."""
        return self._popen.poll() if self._popen is not None else None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the process, SIGKILL it (and its process group) after ``grace`` seconds.

        Returns the exit status (None if it was never started). Safe to call repeatedly.
        """
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._kill_group(popen.pid)
                popen.wait(timeout=10)
        # Children (e.g. python backend stubs) may outlive a SIGTERMed parent; the group id is the
        # PID we started, so this sweeps only our own processes.
        self._kill_group(popen.pid)
        self._popen = None
        _LIVE.discard(self)
        return popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the process group at once (a crash, for fault tests); returns the exit status."""
        popen = self._popen
        if popen is None:
            return None
        self._kill_group(popen.pid)
        popen.wait(timeout=10)
        self._popen = None
        _LIVE.discard(self)
        return popen.returncode

    @staticmethod
    def _kill_group(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
