"""/reviews as a pipeline against /reviews in rounds (``GLOWING_REVIEWS``), side by side.

    .venv/bin/python -m loadtests.reviews --artifacts artifacts --out reports/reviews    # about 6 min
    .venv/bin/python -m loadtests.reviews --smoke --artifacts /tmp/tiny --out /tmp/reviews  # under 2 min

For each mode it starts ``bentoml serve`` (the engine, ``GLOWING_BATCHING=engine``) on a free loopback
port and measures over HTTP, from one asyncio client process:

1. **A lone /reviews** (n 3, min_positive 0.5, 48 tokens, seeded; median of ``--lone``), beside its
   floor: each lone request's number of candidates (as that mode served it) generated in one batched
   call in-process through ``glowing.runtime``, then scored in one call.
2. **Closed-loop clients** (``--users``, default 1 and 16) sending /reviews (n 3, min_positive 0.5,
   max_candidates 32, each seeded): accepted reviews per second, p50 and p99 latency.
3. **Waste** at min_positive 0.9 and the largest client count: tokens generated for rejected or
   cancelled candidates per accepted review (``stats.wasted_tokens``).

Writes ``summary.json`` and ``report.md``; the machine is shared and noisy: compare the modes of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

from loadtests.run import machine
from loadtests.server import Server
from loadtests.serving import Client, _r, percentile

MODES = ("rounds", "pipeline")
BODY = {"prompt": "This movie", "n": 3, "max_new_tokens": 48, "temperature": 1.0, "top_p": 0.95, "top_k": 50,
        "min_positive": 0.5, "max_candidates": 32}
SMOKE = {"users": [1, 4], "duration": 4, "lone": 3}


async def post(client: Client, body: dict) -> tuple[int, float, dict]:
    started = time.perf_counter()
    async with client.session.post(client.url + "/reviews", json=body) as resp:
        data = await resp.json()
        return resp.status, (time.perf_counter() - started) * 1e3, data


async def lone(client: Client, repeats: int) -> dict:
    times, candidates = [], []
    for seed in range(repeats):
        status, ms, data = await post(client, {**BODY, "seed": seed})
        if status == 200:
            times.append(ms)
            candidates.append(data["stats"]["candidates"])
    return {"p50": _r(statistics.median(times)) if times else None, "candidates": candidates}


async def closed_loop(client: Client, users: int, duration: float, body: dict) -> dict:
    end = time.perf_counter() + duration
    done: list[tuple[float, float, dict]] = []
    failures = 0

    async def user(i: int) -> None:
        nonlocal failures
        rng = random.Random(i)
        while time.perf_counter() < end:
            try:
                status, ms, data = await post(client, {**body, "seed": rng.randrange(2**32)})
            except Exception:
                status = 0
            if status == 200:
                done.append((time.perf_counter(), ms, data))
            else:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(user(i) for i in range(users)))
    window = [d for d in done if d[0] <= end]
    ms = [d[1] for d in window]
    accepted = sum(len(d[2]["reviews"]) for d in window)
    wasted = sum(d[2]["stats"]["wasted_tokens"] for d in window)
    return {"users": users, "requests": len(window), "failures": failures, "accepted": accepted,
            "accepted_per_s": round(accepted / (end - started), 2), "p50": _r(percentile(ms, 50)),
            "p99": _r(percentile(ms, 99)), "complete": sum(d[2]["complete"] for d in window),
            "candidates": sum(d[2]["stats"]["candidates"] for d in window),
            "wasted_tokens_per_accepted": round(wasted / accepted, 1) if accepted else None}


def in_process(artifacts: Path, candidates: list[int]) -> float:
    """Median ms to generate each lone request's candidates in one batched call, then score them."""
    from glowing.runtime import SamplingSettings, load_generator, load_scorer

    gen = load_generator(artifacts / "onnx" / "generator", "onnx", "cpu")
    scorer = load_scorer(artifacts / "onnx" / "classifier", "onnx", "cpu")
    times = []
    for seed, count in enumerate(candidates):
        rows = [SamplingSettings(max_new_tokens=BODY["max_new_tokens"], temperature=1.0, top_p=0.95, top_k=50,
                                 seed=seed * 1000 + i) for i in range(count)]
        t = time.perf_counter()
        texts = [BODY["prompt"] + c for c in gen.generate([BODY["prompt"]] * count, rows)]
        scorer.score(texts)
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 1)


async def measure(server: Server, args: argparse.Namespace) -> dict:
    client = Client(server.url, {})
    try:
        out = {"lone": await lone(client, args.lone), "ladder": []}
        for users in args.user_list:
            out["ladder"].append(await closed_loop(client, users, args.duration, BODY))
            print(f"  {users} clients: {out['ladder'][-1]}", flush=True)
        out["strict"] = await closed_loop(client, max(args.user_list), args.duration, {**BODY, "min_positive": 0.9})
        print(f"  min_positive 0.9: {out['strict']}", flush=True)
        return out
    finally:
        await client.close()


def markdown(summary: dict) -> str:
    modes = summary["modes"]
    rows = ["| | " + " | ".join(modes) + " | pipeline / rounds |", "|---|" + "---|" * (len(modes) + 1)]

    def line(name: str, values: list) -> None:
        ratio = round(values[-1] / values[0], 2) if len(values) == 2 and values[0] and values[-1] else ""
        rows.append(f"| {name} | " + " | ".join(str(v) for v in values) + f" | {ratio} |")

    line("lone /reviews n 3, p50 ms", [m["lone"]["p50"] for m in modes.values()])
    for i, users in enumerate(summary["users"]):
        line(f"{users} clients: accepted reviews/s", [m["ladder"][i]["accepted_per_s"] for m in modes.values()])
        line(f"{users} clients: p50 ms", [m["ladder"][i]["p50"] for m in modes.values()])
        line(f"{users} clients: p99 ms", [m["ladder"][i]["p99"] for m in modes.values()])
    line("min_positive 0.9: wasted tokens per accepted review",
         [m["strict"]["wasted_tokens_per_accepted"] for m in modes.values()])
    line("min_positive 0.9: accepted reviews/s", [m["strict"]["accepted_per_s"] for m in modes.values()])
    return (f"# /reviews: pipeline vs rounds\n\n`{summary['command']}`\n\nMachine: {summary['machine']}\n\n"
            + "\n".join(rows) + "\n\nThe lone request against its floor in-process (the same number of "
            "candidates generated in one batched call, then scored in one), median ms: "
            + ", ".join(f"{m} {summary['in_process_ms'][m]} (served / floor {r})"
                        for m, r in summary["floor_ratio"].items()) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtests.reviews", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path(os.environ.get("GLOWING_ARTIFACTS", "artifacts")))
    ap.add_argument("--modes", default=",".join(MODES), help="GLOWING_REVIEWS modes (default: rounds,pipeline)")
    ap.add_argument("--users", default="1,16", help="concurrent clients (default: 1,16)")
    ap.add_argument("--duration", type=float, default=20, help="seconds per step (default: 20)")
    ap.add_argument("--lone", type=int, default=7, help="lone requests (default: 7)")
    ap.add_argument("--out", type=Path, default=Path("reports/reviews"))
    ap.add_argument("--smoke", action="store_true", help=f"a quick check: {SMOKE}")
    args = ap.parse_args(argv)
    if args.smoke:
        args.users, args.duration, args.lone = ",".join(map(str, SMOKE["users"])), SMOKE["duration"], SMOKE["lone"]
    args.user_list = [int(u) for u in args.users.split(",")]
    args.mode_list = args.modes.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in args.mode_list:
        server = Server(args.artifacts.resolve(), args.out / f"{mode}_serve.log",
                        {"GLOWING_BATCHING": "engine", "GLOWING_REVIEWS": mode, "GLOWING_MAX_CONCURRENCY": "256"})
        try:
            print(f"[{mode}] ready after {server.wait_ready():.1f} s on {server.url}", flush=True)
            results[mode] = asyncio.run(measure(server, args))
        finally:
            server.stop()
    floor = {m: in_process(args.artifacts, r["lone"]["candidates"]) for m, r in results.items()}
    summary = {"machine": machine(), "command": "python -m loadtests.reviews " + " ".join(
                   argv if argv is not None else sys.argv[1:]), "users": args.user_list,
               "in_process_ms": floor, "modes": results,
               "floor_ratio": {m: round(r["lone"]["p50"] / floor[m], 2) if r["lone"]["p50"] else None
                               for m, r in results.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "report.md").write_text(markdown(summary))
    print(markdown(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
