"""Real processes for the tests: `python -m jepatune COMMAND` in a session of its own, killed whole."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    """A port nothing listens on now (a fixed one can collide with another run or a lingering socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_args(knobs: dict) -> list[str]:
    """`--set k=v` for each fixed knob, as a user types it (tuples as comma lists)."""
    args = []
    for k, v in knobs.items():
        args += ["--set", f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"]
    return args


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: the driver, the Ray services it started (its
    process group) and Ray's workers, which the raylet puts in process groups of their own."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if os.getsid(int(entry)) == sid and stat.rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry))
        except OSError:  # gone meanwhile
            continue
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Search:
    """`python -m jepatune search ARGS` (or another COMMAND) in a session of its own, with RAY_ADDRESS
    unset and a private Ray temp folder, so that it starts its own local Ray and joins no other; on
    exit every process of the session is killed and awaited, so nothing outlives the test."""

    def __init__(self, args: list[str], log: Path, command: str = "search", ray_address: str | None = None,
                 extra_env: dict[str, str] | None = None):
        self.ray_tmp = tempfile.mkdtemp(prefix="jt-ray-", dir="/tmp")  # short: Ray's socket paths
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({"RAY_TMPDIR": self.ray_tmp, **(extra_env or {})})
        if ray_address is not None:  # join this cluster instead of starting a local Ray
            env["RAY_ADDRESS"] = ray_address
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "jepatune", command, *args], env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> Search:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        subprocess.run(["rm", "-rf", self.ray_tmp], check=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`jepatune search` still running after {timeout:.0f}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the driver's process group (the driver and the Ray services it started), then any
        worker left in the session: without its raylet a worker dies by itself within seconds, but
        it must not write into the experiment folder once the test has read it."""
        sid = self.proc.pid
        try:
            os.killpg(sid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + 30
        while pids := session_pids(sid):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert time.monotonic() < deadline, f"processes of the killed sweep survive: {pids}"
            time.sleep(0.05)


def poll(what: str, ready: Callable[[], bool], search: Search, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not search.alive():
            pytest.fail(f"the sweep ended before {what}:\n{search.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f}s:\n{search.tail()}")
        time.sleep(0.05)


def kill_processes_mentioning(text: str, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL, every process whose command line names `text` (a cluster's own temp
    folder): `ray stop` would stop every Ray of the machine, other tests' included."""
    def matching() -> list[int]:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
        return [pid for pid in pids if text in cmdline(pid)]

    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, timeout)):
        for pid in matching():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while matching() and time.monotonic() < deadline:
            time.sleep(0.1)
