"""``bentoml serve`` of the Glowing service as a subprocess on a free loopback port.

Used by ``loadtests.run`` (one server per scenario) and by the HTTP tests. The server runs in its
own process group; ``stop()`` also ends the descendants that left it (BentoML's API worker).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


class Server:
    """``bentoml serve`` in its own process group on a free loopback port."""

    def __init__(self, artifacts: Path | None, log: Path, env: dict[str, str] | None = None,
                 target: str = "service.service:Glowing", cwd: Path = ROOT):
        """``target``: the service (``module:Class``, imported from ``cwd``) or a built Bento's directory;
        ``artifacts`` None: no GLOWING_ARTIFACTS (a Bento serves the models packed into it)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {**os.environ, "GLOWING_ARTIFACTS": str(artifacts), "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
        if artifacts is None:
            full_env.pop("GLOWING_ARTIFACTS")
        key = full_env.get("GLOWING_API_KEY", "")  # the server will require it (not on /readyz)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1",
                 "--port", str(self.port)], cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < READY_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if http_get(f"{self.url}/readyz", timeout=2)[0] == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"not ready after {READY_S} s:\n{self.output()[-3000:]}")

    def metrics(self) -> str:
        try:
            return http_get(f"{self.url}/metrics", headers=self.headers)[1]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 10 s; then SIGKILL whatever is left of the server's
        descendants: BentoML's API worker runs in a process group of its own and can outlive the group."""
        family = descendants(self.proc.pid)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def descendants(root: int) -> list[int]:
    """Process ids below ``root`` (Linux /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    return found
