"""Several hosts on one machine: Linux network namespaces on a bridge, for multi-host tests.

`Network(["server", "w1", "w2"])` makes one network namespace per host and a switch namespace
holding a bridge; each host gets a veth into the bridge and an address in a private /24 picked
per run (10.x.y.0/24), and names carry a random suffix, so runs side by side never clash. The
root namespace gets no interface: nothing outside the hosts can reach them, and they reach
nothing but each other (their only route is the /24).

A `Host` runs commands as `ManagedProcess`es through `ip netns exec` (which execs, so the
handle's pid is the program's), and `entered()` moves the calling *thread* into the host's
namespace (setns(2)): sockets it opens there and children it starts belong to the host, which
is how readiness probes, clients and the dev-stack handles (`PrefectServer`, `SeaweedFS`,
`PostgresServer`, `EmulatorProcess`, each given the host's address) work on a host unchanged.
`kill()` SIGKILLs every process in the host's namespace (`ip netns pids`), as a host dying
would. `stop()` (or leaving the `with`, also on an error or Ctrl-C, and at interpreter exit)
stops the processes started through the hosts, kills what is left in each namespace, and only
then deletes the namespaces (a namespace deleted while a process still runs in it lives on).

`LoopbackNetwork` has the same interface on 127.0.0.1 without namespaces, for machines where
they cannot be made (`available()` says why): hosts are then only separate processes.
Needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN, and iproute2's `ip`; Linux only.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from wan_tasks.devstack.processes import (
    HOST,
    ManagedProcess,
    ProcInfo,
    descendants,
    proc_info,
    signal_process,
    wait_until,
)
from wan_tasks.errors import LocalServiceError

logger = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21
_NETNS_DIR = Path("/run/netns")
_BRIDGE = "br0"
_HOST_IF = "veth0"
_IP_TIMEOUT_S = 30.0


# -- can namespaces be made here? -----------------------------------------------------------


@dataclass(frozen=True)
class Support:
    """Whether network namespaces can be made here; `reason` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


_support: Support | None = None
_support_lock = threading.Lock()


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False
    )
    if check and done.returncode != 0:
        raise LocalServiceError(
            f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}"
        )
    return done


def _probe() -> Support:
    if not sys.platform.startswith("linux"):
        return Support(False, f"network namespaces are Linux only (this is {sys.platform})")
    if os.geteuid() != 0:
        return Support(False, "not root: `ip netns add` needs root")
    caps = _effective_caps()
    for bit, name in ((_CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (_CAP_NET_ADMIN, "CAP_NET_ADMIN")):
        if not caps >> bit & 1:
            return Support(False, f"root without {name} (a restricted container?)")
    if shutil.which("ip") is None:
        return Support(False, "`ip` (iproute2) is not installed")
    # The capabilities can be there and still be refused (seccomp, a read-only /run): try it.
    name = f"wtprobe-{secrets.token_hex(4)}"
    try:
        _ip("netns", "add", name)
        try:
            _ip("-n", name, "link", "add", "pa", "type", "veth", "peer", "name", "pb")
        finally:
            _ip("netns", "del", name, check=False)
    except (LocalServiceError, OSError, subprocess.SubprocessError) as exc:
        return Support(False, f"making a test namespace failed: {exc}")
    return Support(True)


def available() -> Support:
    """Whether this process can make network namespaces (root, CAP_SYS_ADMIN, CAP_NET_ADMIN,
    `ip`, and a real attempt that worked); the result is kept for the process."""
    global _support
    with _support_lock:
        if _support is None:
            _support = _probe()
        return _support


# -- entering a namespace from this thread ----------------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LocalServiceError(f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


@contextlib.contextmanager
def _in_netns(path: Path) -> Iterator[None]:
    """The calling thread in the namespace at `path` (only this thread: setns(2) moves one
    task), and back to where it was on the way out."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


# -- hosts ---------------------------------------------------------------------------------


class Host:
    """One machine of a test network: a name, an address, processes started on it, and a
    way to die. Processes started through `run` are tracked, so the network's `stop()` stops
    them through their handles."""

    name: str
    address: str

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def _prefix(self) -> list[str]:
        return []

    def entered(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def run(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 20.0,
    ) -> ManagedProcess:
        """`cmd` on this host, as a ManagedProcess (its environment through `env`, never on
        the command line: command lines are visible in `ps`)."""
        proc = ManagedProcess(
            f"{name}@{self.name}",
            [*self._prefix(), *cmd],
            log=log,
            env=env,
            cwd=cwd,
            stop_signal=stop_signal,
            stop_timeout=stop_timeout,
        )
        self.processes.append(proc)
        return proc

    def call(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` on this host to completion; its output (stdout and stderr) as text."""
        return subprocess.run(
            [*self._prefix(), *cmd],
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )

    def wait_for_http(
        self, url: str, process: ManagedProcess, *, timeout: float, what: str = "healthy"
    ) -> None:
        """Poll GET `url` from this host until it answers 200 (the probe's sockets are
        opened inside the host: other hosts' addresses are not reachable from outside)."""
        with self.entered(), httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0)) as http:

            def answers() -> bool:
                try:
                    return http.get(url).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(what, answers, process, timeout=timeout, interval=0.25)

    def kill(self) -> int:
        raise NotImplementedError

    def stop_processes(self) -> None:
        """Stop what was started through `run`, newest first; every one even if one fails."""
        procs, self.processes = self.processes[::-1], []
        interrupted: BaseException | None = None
        for proc in procs:
            try:
                proc.stop()
            except Exception:
                logger.exception("stopping %s failed", proc.name)
            except BaseException as exc:
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted


class NamespaceHost(Host):
    """A host that is a network namespace on the network's bridge."""

    def __init__(self, name: str, netns: str, address: str) -> None:
        super().__init__()
        self.name, self.netns, self.address = name, netns, address

    def __repr__(self) -> str:
        return f"NamespaceHost({self.name!r}, netns={self.netns!r}, address={self.address!r})"

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def entered(self) -> contextlib.AbstractContextManager[None]:
        """This thread inside the host: its sockets and the children it starts are the
        host's. Only this thread; clients made inside must also be used inside."""
        return _in_netns(_NETNS_DIR / self.netns)

    def pids(self) -> list[int]:
        """Every process in this host's namespace now."""
        done = _ip("netns", "pids", self.netns, check=False)
        if done.returncode != 0:
            return []
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    def kill(self) -> int:
        """SIGKILL every process in the namespace, as a host losing power would: no process
        gets to clean up. Repeats until none is left (a worker may be forking a flow run
        meanwhile). Returns how many processes were killed."""
        killed: set[tuple[int, int]] = set()
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            found = [i for pid in self.pids() if (i := proc_info(pid)) is not None]
            alive = [i for i in found if not i.exited]
            if not alive:
                break
            for info in alive:
                signal_process(info, signal.SIGKILL)
                killed.add((info.pid, info.start_time))
            time.sleep(0.1)
        for proc in self.processes:
            proc.alive()  # reap our own children, so they do not linger as zombies
        logger.info("host %s (%s) killed: %d processes", self.name, self.netns, len(killed))
        return len(killed)


class LoopbackHost(Host):
    """A "host" that is only a set of processes on 127.0.0.1 (no namespaces)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.address = name, HOST

    def __repr__(self) -> str:
        return f"LoopbackHost({self.name!r})"

    def kill(self) -> int:
        """SIGKILL every process started through this host and everything below them (a
        worker's flow runs live in sessions of their own): the closest a shared machine gets
        to a host dying. Returns how many processes were killed."""
        victims: list[ProcInfo] = []
        for proc in self.processes:
            if proc.alive() and (info := proc_info(proc.pid)) is not None:
                victims += [info, *descendants(proc.pid)]
        for info in victims:
            signal_process(info, signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        logger.info("host %s killed: %d processes", self.name, len(victims))
        return len(victims)


# -- networks ------------------------------------------------------------------------------


class _NetworkBase:
    namespaces = False

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def start(self) -> Self:
        return self

    def stop(self) -> None:
        interrupted: BaseException | None = None
        for host in reversed(self.hosts.values()):
            try:
                host.stop_processes()
            except BaseException as exc:
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LoopbackNetwork(_NetworkBase):
    """The fallback: every host on 127.0.0.1 (separate processes, nothing else separate)."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        _check_names(names)
        self.hosts = {name: LoopbackHost(name) for name in names}


class Network(_NetworkBase):
    """Hosts as network namespaces on a bridge in a switch namespace; see the module doc.

    with Network(["server", "w1"]) as net:
        with net["server"].entered():
            server = PrefectServer(home, host=net["server"].address).start()
        net["w1"].run("worker", [...], log=..., env=...)
    """

    namespaces = True

    def __init__(self, names: Sequence[str], *, subnet: str | None = None) -> None:
        super().__init__()
        _check_names(names)
        if len(names) > 250:
            raise ValueError(f"at most 250 hosts on one /24, got {len(names)}")
        self.run_id = secrets.token_hex(3)
        # Private and per run; since the root namespace has no route into it, only runs that
        # bridge namespaces together could ever clash, and these never do.
        rng = random.SystemRandom()
        self.subnet = ipaddress.ip_network(
            subnet or f"10.{rng.randrange(64, 255)}.{rng.randrange(0, 256)}.0/24"
        )
        if self.subnet.prefixlen != 24:
            raise ValueError(f"subnet must be a /24, got {self.subnet}")
        self.switch = f"wt{self.run_id}-sw"
        base = self.subnet.network_address
        self._ns_hosts = [
            NamespaceHost(name, f"wt{self.run_id}-{name}", str(base + i))
            for i, name in enumerate(names, start=1)
        ]
        self.hosts = {host.name: host for host in self._ns_hosts}
        self._made: list[str] = []

    def __repr__(self) -> str:
        return f"Network({list(self.hosts)}, subnet={self.subnet}, run={self.run_id})"

    @property
    def cidr(self) -> str:
        return str(self.subnet)

    def start(self) -> Self:
        support = available()
        if not support:
            raise LocalServiceError(f"network namespaces cannot be made here: {support.reason}")
        atexit.register(self.stop)
        began = time.monotonic()
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "add", _BRIDGE, "type", "bridge")
            _ip("-n", self.switch, "link", "set", _BRIDGE, "up")
            for i, host in enumerate(self._ns_hosts, start=1):
                self._add(host.netns)
                port = f"p{i}"
                _ip("link", "add", _HOST_IF, "netns", host.netns, "type", "veth",
                    "peer", "name", port, "netns", self.switch)  # fmt: skip
                _ip("-n", self.switch, "link", "set", port, "master", _BRIDGE, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", _HOST_IF)
                _ip("-n", host.netns, "link", "set", _HOST_IF, "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.stop()
            raise
        logger.info(
            "network %s: %s in %.2fs",
            self.cidr,
            ", ".join(f"{h.name}={h.address}" for h in self.hosts.values()),
            time.monotonic() - began,
        )
        return self

    def _add(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._made.append(netns)

    def stop(self) -> None:
        """Stop the hosts' processes through their handles, kill anything left in each
        namespace, then delete the namespaces (idempotent; also runs at exit)."""
        atexit.unregister(self.stop)
        interrupted: BaseException | None = None
        try:
            super().stop()
        except BaseException as exc:
            interrupted = exc
        for host in self._ns_hosts:
            if host.netns in self._made:
                try:
                    host.kill()
                except Exception:
                    logger.exception("killing what was left on %s failed", host.name)
                except BaseException as exc:
                    interrupted = interrupted or exc
        for netns in reversed(self._made):
            done = _ip("netns", "del", netns, check=False)
            if done.returncode != 0:
                logger.warning("ip netns del %s: %s", netns, done.stderr.strip())
        self._made = []
        if interrupted is not None:
            raise interrupted


def _check_names(names: Sequence[str]) -> None:
    if not names:
        raise ValueError("names: give at least one host")
    if len(set(names)) != len(names):
        raise ValueError(f"names: must be unique, got {list(names)}")
    for name in names:
        # Part of a namespace name, and of a file name under /run/netns.
        if not (name and len(name) <= 12 and name.replace("-", "").isalnum() and name.isascii()):
            raise ValueError(f"names: {name!r} must be 1-12 letters, digits or dashes")


def make_network(names: Sequence[str]) -> Network | LoopbackNetwork:
    """Namespaces where they can be made, else the loopback fallback (logged, with why)."""
    support = available()
    if support:
        return Network(names)
    logger.warning("no network namespaces (%s): hosts are processes on 127.0.0.1", support.reason)
    return LoopbackNetwork(names)
