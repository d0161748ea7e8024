"""One Locust run in distributed mode: a master and N worker processes, all on loopback.

``loadtests.run --workers N`` uses it when one load-generating process cannot keep up (Locust is one
Python process on one core; past about one core's worth of requests it, not the server, is the limit).
The master binds a free loopback port, takes the headless run's flags (users, run time, CSV and JSON
output: its statistics are the workers' merged, so the report reads them as it reads a single
process's) and waits for the workers; each worker runs the same locustfile and user class and writes
its own running totals (``LOADTEST_WORKER_COUNTS``), so the run can check that the master's aggregate
lost nothing. Every process is stopped when the run ends, fails, or is interrupted (``SIGTERM`` reaches
the caller as ``SystemExit``).

By hand, the same thing (two workers):

    locust -f loadtests/locustfile.py ScoreUser --headless -u 32 -r 32 -t 15s --host http://127.0.0.1:3000 \\
        --master --master-bind-host 127.0.0.1 --master-bind-port 5557 --expect-workers 2 --csv /tmp/score &
    locust -f loadtests/locustfile.py ScoreUser --host http://127.0.0.1:3000 --worker --master-host 127.0.0.1 \\
        --master-port 5557 &     # twice
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from loadtests.server import ROOT, free_port

WORKERS_WAIT_S = 60   # the master gives up (exit 1) when the workers have not all connected by then
WORKER_EXIT_S = 20    # after the master: the workers' users finish their requests (--stop-timeout 10)


def worker_counts_file(prefix: Path, index: int) -> Path:
    return Path(f"{prefix}_worker{index}_counts.json")


def run(base: list[str], headless: list[str], workers: int, prefix: Path, env: dict[str, str], log: Path,
        timeout: float) -> int:
    """Run ``base + headless`` as the master and ``base`` as ``workers`` workers; the master's exit status.

    ``base``: the locust command, locustfile, user class, host and log level (what both sides need);
    ``headless``: the run's flags (users, run time, output), for the master only. Logs go to ``log``
    (the master's) and ``PREFIX_workerI.log``."""
    port = free_port()
    master_cmd = [*base, *headless, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                  "--expect-workers", str(workers), "--expect-workers-max-wait", str(WORKERS_WAIT_S)]
    worker_cmd = [*base, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        logs.append(open(log, "wb"))
        master = subprocess.Popen(master_cmd, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT)
        procs.append(master)
        for i in range(workers):
            counts = worker_counts_file(prefix, i)
            counts.unlink(missing_ok=True)
            logs.append(open(f"{prefix}_worker{i}.log", "wb"))
            procs.append(subprocess.Popen(worker_cmd, cwd=ROOT, env={**env, "LOADTEST_WORKER_COUNTS": str(counts)},
                                          stdout=logs[-1], stderr=subprocess.STDOUT))
        rc = master.wait(timeout)
        deadline = time.monotonic() + WORKER_EXIT_S
        for proc in procs[1:]:  # the master sent them "quit"; one that did not get it is stopped below
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        return rc
    finally:
        stop(procs)
        for log in logs:
            log.close()


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every process still running (Locust writes its output on it), SIGKILL after 5 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker_requests(prefix: Path, workers: int, endpoint: str) -> list[int]:
    """Requests to ``/endpoint`` that each worker reported to the master (0 for a worker that wrote none)."""
    out = []
    for i in range(workers):
        path = worker_counts_file(prefix, i)
        totals = json.loads(path.read_text()) if path.is_file() else {}
        out.append(totals.get(f"/{endpoint}", {}).get("requests", 0))
    return out
