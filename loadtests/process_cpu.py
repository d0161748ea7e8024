"""Where the CPU of a served ``/score`` goes: requests/s, and CPU milliseconds per request of each server
process (from /proc) and of the client, under N closed-loop clients.

    python -m loadtests.process_cpu --artifacts artifacts --users 16,32
    python -m loadtests.process_cpu --artifacts artifacts --checkout /tmp/old-main --batching adaptive

The client is one asyncio process (aiohttp, about 0.2 ms of CPU per request: a third of Locust's), so
that the server, not the load generator, is what saturates; each client posts one payload text per
request (the loadtest's 256 IMDB test reviews, in turn). A process at about 100% of a core while the
machine has cores to spare is the bottleneck (a process's Python work shares one GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from loadtests.payloads import default_data_dir, sample
from loadtests.server import ROOT, Server, descendants


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def role(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return "?"
    for name in ("glowing-scorer", "glowing-generator"):
        if f"--service-name {name}" in cmd:
            return name
    return "glowing (API)" if "--service-name glowing" in cmd else "bentoml serve"


async def step(url: str, texts: list[str], users: int, duration: float, warmup: float, pids: list[int]) -> dict:
    import aiohttp

    done, stop = 0, time.monotonic() + warmup + duration
    counting = time.monotonic() + warmup

    async def client(i: int, session) -> None:
        nonlocal done
        k = i
        while time.monotonic() < stop:
            async with session.post(url + "/score", json={"texts": [texts[k % len(texts)]]}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"/score answered {resp.status}")
            k += users
            if time.monotonic() >= counting:
                done += 1

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(i, session)) for i in range(users)]
        await asyncio.sleep(warmup)
        before = {p: cpu_seconds(p) for p in pids}
        mine, started = time.process_time(), time.monotonic()
        await asyncio.gather(*tasks)
        wall = time.monotonic() - started
        after = {p: cpu_seconds(p) for p in pids}
    n = max(1, done)
    rows = {role(p): (after[p] - before[p]) for p in pids if after[p] - before[p] > 0.005 * wall}  # idle ones left out
    return {"users": users, "req_s": done / duration, "client_ms": 1000 * (time.process_time() - mine) / n,
            "processes": {name: {"ms_per_request": 1000 * cpu / n, "core_share": cpu / wall}
                          for name, cpu in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.process_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder to serve (default: artifacts)")
    ap.add_argument("--users", default="16,32", help="comma list of concurrent clients, one step each (default: 16,32)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds measured per step, after --warmup (default: 15)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each step is measured (default: 3)")
    ap.add_argument("--batching", choices=("engine", "adaptive"), default="engine",
                    help="GLOWING_BATCHING of the server (default: engine)")
    ap.add_argument("--checkout", type=Path, default=ROOT,
                    help="the Glowing checkout whose service is served, e.g. a git worktree of an older commit "
                         "(default: this one)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="folder with imdb/test.parquet for the payload texts (default: $GLOWING_DATA_DIR or ../shared/data)")
    args = ap.parse_args(argv)
    texts = sample(args.data_dir or default_data_dir())["texts"]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"glowing-process-cpu-{os.getpid()}.log"
    server = Server(args.artifacts.resolve(), log, cwd=args.checkout.resolve(),
                    env={"GLOWING_BATCHING": args.batching, "GLOWING_MAX_CONCURRENCY": "1024"})
    try:
        server.wait_ready()
        pids = [server.proc.pid, *descendants(server.proc.pid)]
        print(f"/score, one text per request, GLOWING_BATCHING={args.batching}, checkout {args.checkout}")
        for users in [int(u) for u in args.users.split(",")]:
            r = asyncio.run(step(server.url, texts, users, args.duration, args.warmup, pids))
            print(f"{users:3d} clients: {r['req_s']:7.1f} req/s; client {r['client_ms']:.2f} CPU-ms/request")
            for name, p in sorted(r["processes"].items(), key=lambda x: -x[1]["ms_per_request"]):
                print(f"      {name:18s} {p['ms_per_request']:6.2f} CPU-ms/request, {100 * p['core_share']:4.0f}% of a core")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
