"""Child processes of the dev stack: free loopback ports, a managed child in its own session,
and waits until a child is ready.

`ManagedProcess` starts a command in a session of its own (so its process group is exactly it
and its helpers, and a Ctrl-C at the terminal reaches only this process, which then stops the
child through its handle), writes its output to a log file, and stops it by signalling that
group: SIGTERM (or the signal given), a wait, then SIGKILL. Processes are only ever signalled
through a handle or a recorded (pid, start time) pair, never looked up by name.

`wait_until` and `wait_for_http` poll with a deadline; when the child dies or the deadline
passes they raise `LocalServiceError` quoting the last lines of the child's log.

Linux only where /proc is read (descendants, start times); stdlib and httpx only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import httpx

from wan_tasks.errors import LocalServiceError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
LOG_TAIL_LINES = 15


def free_port(host: str = HOST) -> int:
    """A TCP port free on `host` right now (the kernel's pick; another process may take it
    before the caller binds it, so starters retry on "address already in use")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# -- processes by pid, from /proc ---------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    start_time: int  # clock ticks after boot: with the pid, identifies one process for good
    state: str = "R"

    @property
    def exited(self) -> bool:
        return self.state in ("Z", "X")  # a zombie has exited; only its parent can reap it


def proc_info(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    return ProcInfo(pid=pid, ppid=int(rest[1]), start_time=int(rest[19]), state=rest[0])


def descendants(pid: int) -> list[ProcInfo]:
    """Every process below `pid` now (Linux /proc; elsewhere none are found)."""
    children: dict[int, list[ProcInfo]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (info := proc_info(int(entry.name))) is not None:
                children.setdefault(info.ppid, []).append(info)
    found: list[ProcInfo] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child.pid)
    return found


def same_process(info: ProcInfo) -> bool:
    """Whether `info` still names a live process (same pid and start time, not a zombie)."""
    now = proc_info(info.pid)
    return now is not None and now.start_time == info.start_time and not now.exited


def signal_process(info: ProcInfo, sig: signal.Signals) -> None:
    # Only a process seen below one of ours, and only while it is still that process.
    if same_process(info):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(info.pid, sig)


def terminate_orphan(info: ProcInfo, timeout: float) -> None:
    """Like `ManagedProcess.stop`, for a recorded child whose parent (and handle) is gone."""
    below = descendants(info.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(info.pid, signal.SIGTERM)
    for child in below:
        signal_process(child, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while same_process(info) and time.monotonic() < deadline:
        time.sleep(0.2)
    if same_process(info):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(info.pid, signal.SIGKILL)
    for child in below:
        signal_process(child, signal.SIGKILL)


# -- termination signals and plain children ----------------------------------------------------


def interrupt_on_sigterm() -> None:
    """Make SIGTERM run every cleanup a Ctrl-C would, so servers a script started are stopped
    by their handles (`with` blocks, `finally`) when it is killed, not left running. For a
    script's main thread, before it starts anything. The KeyboardInterrupt it raises says
    "SIGTERM" (`from_sigterm`)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)


def from_sigterm(exc: BaseException) -> bool:
    """Whether `exc` is the KeyboardInterrupt `interrupt_on_sigterm` raises."""
    return isinstance(exc, KeyboardInterrupt) and exc.args == ("SIGTERM",)


def end_child(proc: subprocess.Popen[Any], exc: BaseException, grace_s: float = 30.0) -> None:
    """A child of this script, left behind by `exc`: on a Ctrl-C it has had the SIGINT too
    (one process group) and stops itself; otherwise (SIGTERM, a timeout, an error) it is sent
    SIGTERM. Either way it gets `grace_s` to stop the servers it started, then SIGKILL."""
    if not isinstance(exc, KeyboardInterrupt) or from_sigterm(exc):
        proc.terminate()
    with contextlib.suppress(BaseException):  # a second Ctrl-C, or out of time: SIGKILL
        # communicate(), not wait(): it drains piped output meanwhile (a child writing to a
        # full pipe would never exit).
        proc.communicate(timeout=grace_s)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run_child(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float,
    grace_s: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(command, capture_output=True, text=True)`, except that a child left
    behind by an exception here (a Ctrl-C, a SIGTERM turned into one, the timeout) is given
    `grace_s` to stop the servers it started (sent SIGTERM unless a Ctrl-C reached it
    already), not SIGKILLed at once as `subprocess.run` does (which leaves them running)."""
    with subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException as exc:
            end_child(proc, exc, grace_s)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# -- a managed child ------------------------------------------------------------------------------


def _swallow(signum: int, frame: FrameType | None) -> None:
    pass


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """Children inherit an ignored SIGINT (a parent started with `&` from a script, nohup).
    A Prefect worker stops on SIGTERM by sending itself SIGINT, so it would never stop. A
    handler, unlike SIG_IGN, is reset to the default by exec."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    ):
        yield
        return
    signal.signal(signal.SIGINT, _swallow)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class ManagedProcess:
    """A child in its own session, its output appended to `log`; started on construction.

        with ManagedProcess("worker", cmd, log=logs / "worker.log") as proc:
            wait_for_http(url, proc, timeout=60)

    `stop()` signals the whole group with `stop_signal`, waits `timeout` seconds, then
    SIGKILLs the group and every process that was below the child (some, like a Prefect
    worker's flow runs, live in sessions of their own). It is idempotent.
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 20.0,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name, self.log = name, Path(log)
        self.stop_signal, self.stop_timeout = stop_signal, stop_timeout
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out, _sigint_not_ignored():
            self._log_offset = out.tell()  # error excerpts quote only this run's lines
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                list(cmd),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        info = proc_info(self.proc.pid)
        self.start_time = info.start_time if info else 0
        logger.debug("%s started (pid %d), log %s", name, self.proc.pid, self.log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code, once it exits (subprocess.TimeoutExpired after `timeout`)."""
        return self.proc.wait(timeout)

    def output(self) -> str:
        """What this process wrote to its log since it started."""
        try:
            with self.log.open("rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def failure(self, what: str) -> LocalServiceError:
        """An error naming this process, what went wrong and the end of its log."""
        if not self.alive() and "code" not in what:
            what = f"{what} (exit code {self.proc.returncode})"
        return LocalServiceError(f"{self.name} {what}; last lines of {self.log}:\n{self.tail()}")

    def stop(self, timeout: float | None = None) -> None:
        timeout = self.stop_timeout if timeout is None else timeout
        if not self.alive():
            self._kill_group()  # helpers it left behind in its group
            return
        below = descendants(self.proc.pid)
        began = time.monotonic()
        try:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, self.stop_signal)
            for info in below:
                signal_process(info, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) ignored %s for %.0fs; killing it",
                    self.name,
                    self.proc.pid,
                    self.stop_signal.name,
                    timeout,
                )
        finally:
            # Also reached on a second Ctrl-C during the wait: never leave anything running.
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self._kill_group()
            for info in below:
                signal_process(info, signal.SIGKILL)
        logger.info(
            "%s (pid %d) stopped in %.1fs", self.name, self.proc.pid, time.monotonic() - began
        )

    def _kill_group(self) -> None:
        """SIGKILL what the (reaped) child left in its group. The kernel reuses a pid only
        once no group or session still carries it, so while any of those helpers lives the
        group id is ours; a live process with the child's pid means it was reused, and the
        group is then someone else's."""
        if proc_info(self.proc.pid) is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- waiting until ready ----------------------------------------------------------------------


def wait_until(
    what: str,
    ready: Callable[[], bool],
    process: ManagedProcess,
    *,
    timeout: float,
    interval: float = 0.2,
) -> None:
    """Poll `ready()` until it is true. Raises `LocalServiceError` (with the process's log
    tail) if the process exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not process.alive():
            raise process.failure(f"exited before {what}")
        if time.monotonic() > deadline:
            raise process.failure(f"not {what} after {timeout:.0f}s")
        time.sleep(interval)


def wait_for_http(
    url: str,
    process: ManagedProcess,
    *,
    timeout: float,
    interval: float = 0.25,
    what: str = "healthy",
) -> None:
    """Poll GET `url` until it answers 200 (see `wait_until`)."""
    with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0)) as http:

        def answers() -> bool:
            try:
                return http.get(url).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(what, answers, process, timeout=timeout, interval=interval)


def port_taken(process: ManagedProcess) -> bool:
    """Whether the process died because its port was taken between `free_port` and bind."""
    out = process.output().lower()
    return not process.alive() and ("address already in use" in out or "errno 98" in out)
