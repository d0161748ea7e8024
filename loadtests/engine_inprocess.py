"""The serving engine against request-level batches, in one process, no HTTP: where its throughput goes.

    python -m loadtests.engine_inprocess --artifacts artifacts                      # about 2 min
    python -m loadtests.engine_inprocess --artifacts artifacts --call-positions 256,512,2048

The workload of ``loadtests.serving``'s /generate ladder: ``--users`` closed-loop clients, each
request 4 rows of the prompt "This movie", ``max_new_tokens`` drawn from 16-128, seeded. Contenders,
taking turns for ``--seconds`` each, ``--repeats`` rounds (median kept):

- ``engine (CALL_POSITIONS=N)``: ``glowing.runtime.engine.Engine`` stepped in this thread, a client
  submitting its next request when its last one ended; one contender per ``--call-positions`` value
  (the padding, in positions, under which newcomers merge into a running cohort);
- ``request-level``: what adaptive batching does with the model, without BentoML: batches of up to
  16 requests through ``Generator.generate_ids``, each batch run to its end.

Prints tokens/s, requests/s, and for the engine the mean cohort width and model calls per second:
the engine pays attention over its cohort's whole width at every step, request-level batches start
narrow. The machine named in the output; ratios within one run are what to read.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from glowing.runtime import SamplingSettings, load_generator
from glowing.runtime import engine as engine_module
from loadtests.run import machine

PROMPT = "This movie"


def derive_seed(seed: int, row: int) -> int:
    from service.batching import derive_seed as derive  # the seeds the API gives a request's rows

    return derive(seed, row)


def request(rng: random.Random) -> list[SamplingSettings]:
    seed, tokens = rng.randrange(2**31), rng.randint(16, 128)
    return [SamplingSettings(max_new_tokens=tokens, temperature=1.0, top_k=50, top_p=0.95,
                             seed=derive_seed(seed, i)) for i in range(4)]


def run_engine(gen, users: int, seconds: float, call_positions: int) -> dict:
    engine_module.CALL_POSITIONS = call_positions
    engine = engine_module.Engine(gen, max_rows=64, max_waiting_steps=8)
    rngs = [random.Random(u) for u in range(users)]
    done, tokens = [0], [0]
    end = time.perf_counter() + seconds

    def submit(user: int) -> None:
        left = [4]

        def sink(updates) -> None:
            for u in updates:
                if u.finish is not None:
                    tokens[0] += len(u.tokens or ())
                    left[0] -= 1
            if left[0] == 0:
                done[0] += 1
                if time.perf_counter() < end:
                    submit(user)

        engine.submit(PROMPT, request(rngs[user]), sink, stream=False)

    for user in range(users):
        submit(user)
    widths, started = [], time.perf_counter()
    while time.perf_counter() < end:
        engine.step()
        widths += [c.mask.shape[1] for c in engine._cohorts]
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens[0] / elapsed, "requests_per_s": done[0] / elapsed,
            "mean_width": statistics.mean(widths) if widths else 0.0, "calls_per_s": engine.steps / elapsed}


def run_request_level(gen, users: int, seconds: float) -> dict:
    rngs = [random.Random(u) for u in range(users)]
    end, started, done, tokens = time.perf_counter() + seconds, time.perf_counter(), 0, 0
    while time.perf_counter() < end:
        batch = [request(rngs[u]) for u in range(min(users, 16))]
        rows = [s for r in batch for s in r]
        tokens += sum(map(len, gen.generate_ids([PROMPT] * len(rows), rows)))
        done += len(batch)
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "requests_per_s": done / elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.engine_inprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts with onnx/generator/")
    ap.add_argument("--users", type=int, default=16, help="closed-loop clients (default: 16)")
    ap.add_argument("--seconds", type=float, default=10, help="seconds per contender and round (default: 10)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, contenders taking turns (default: 3)")
    ap.add_argument("--call-positions", default=str(engine_module.CALL_POSITIONS),
                    help="comma list of engine CALL_POSITIONS values to race (default: the engine's own)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    args = ap.parse_args(argv)
    try:
        values = [int(v) for v in args.call_positions.split(",")]
    except ValueError:
        ap.error(f"--call-positions: a comma list of integers, got {args.call_positions!r}")
    if min(args.users, args.repeats) < 1 or args.seconds <= 0 or min(values) < 1:
        ap.error("--users, --repeats, --call-positions must be >= 1 and --seconds > 0")
    gen = load_generator(args.artifacts / "onnx" / "generator", "onnx", "cpu", threads=args.threads)
    default = engine_module.CALL_POSITIONS
    results: dict[str, list[dict]] = {}
    try:
        for _ in range(args.repeats):
            for value in values:
                name = f"engine (CALL_POSITIONS={value})"
                results.setdefault(name, []).append(run_engine(gen, args.users, args.seconds, value))
                print(name, {k: round(v, 1) for k, v in results[name][-1].items()}, flush=True)
            results.setdefault("request-level", []).append(run_request_level(gen, args.users, args.seconds))
            print("request-level", {k: round(v, 1) for k, v in results["request-level"][-1].items()}, flush=True)
    finally:
        engine_module.CALL_POSITIONS = default
    m = machine()
    print(f"\nMachine: {m['cpu']}, {m['cores']} cores; {args.users} clients, {args.threads} thread(s), median of "
          f"{args.repeats} rounds of {args.seconds:g} s\n")
    print("| contender | tokens/s | requests/s | mean cohort width | model calls/s |\n|---|---|---|---|---|")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {med['tokens_per_s']:.0f} | {med['requests_per_s']:.1f} | "
              f"{med.get('mean_width', float('nan')):.1f} | {med.get('calls_per_s', float('nan')):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
