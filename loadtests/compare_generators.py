"""/reviews with the fine-tuned vs the RL-tuned generator: acceptance rate and candidates per request.

    python -m loadtests.compare_generators finetuned=artifacts rl=/tmp/artifacts-rl \\
        --out reports/compare-generators    # 2 x 48 requests: about 40 s on 2 cores

What it measured on the cpu-preset models, with the machine: docs/TRAINING.md, "RL tuning".

Each NAME=DIR is an artifacts directory exported with the generator to compare (`python -m export
--generator finetuned|rl`). For each one in turn: `bentoml serve` on a free loopback port
(loadtests/server.py), the same fixed prompts (openings of IMDB test reviews, loadtests/payloads.py)
sent one at a time with the same settings and seeds, then the server stops. HTTP only. Writes
summary.json and report.md: the acceptance rate (accepted / generated candidates, over all
requests), candidates per request, the share of complete answers, latency, and a sample review.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from loadtests import payloads
from loadtests.server import Server

# The service's /reviews defaults, with responses as long as the cpu preset's RL tuning made them.
SETTINGS = {"n": 3, "min_positive": 0.9, "max_candidates": 32, "max_new_tokens": 48, "temperature": 1.0,
            "top_k": 50, "top_p": 0.95}


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def measure(name: str, artifacts: Path, prompts: list[str], settings: dict, log_dir: Path) -> dict:
    server = Server(artifacts, log_dir / f"{name}.log")
    try:
        server.wait_ready()
        with urllib.request.urlopen(f"{server.url}/info", timeout=30) as resp:
            info = json.loads(resp.read())
        rows = []
        for i, prompt in enumerate(prompts):
            started = time.perf_counter()
            out = post(f"{server.url}/reviews", {"prompt": prompt, "seed": i, **settings})
            rows.append({"prompt": prompt, "ms": (time.perf_counter() - started) * 1000, **out["stats"],
                         "complete": out["complete"], "reviews": out["reviews"]})
            print(f"{name} {i + 1}/{len(prompts)}: {out['stats']['accepted']}/{out['stats']['candidates']} accepted",
                  file=sys.stderr)
    finally:
        server.stop()
    candidates = sum(r["candidates"] for r in rows)
    accepted = sum(r["accepted"] for r in rows)
    sample = next((r["reviews"][0] for r in rows if r["reviews"]), None)
    return {"artifacts": str(artifacts), "served_generator": info.get("models", {}).get("generator", {}),
            "requests": len(rows), "acceptance_rate": accepted / candidates if candidates else 0.0,
            "candidates_per_request": candidates / len(rows), "complete_share": sum(r["complete"] for r in rows) / len(rows),
            "rounds_per_request": sum(r["rounds"] for r in rows) / len(rows),
            "p50_ms": statistics.median(r["ms"] for r in rows), "sample": sample, "rows": rows}


def report(results: dict, settings: dict, n_prompts: int) -> str:
    lines = ["# /reviews: generators compared", "",
             f"{n_prompts} prompts (IMDB test openings), one request at a time, seed = prompt index; settings "
             f"{json.dumps(settings)}.", "",
             "| generator | trained | acceptance rate | candidates / request | complete | rounds / request | p50 ms |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['served_generator'].get('trained')} | {r['acceptance_rate']:.3f} | "
                     f"{r['candidates_per_request']:.2f} | {r['complete_share']:.0%} | {r['rounds_per_request']:.2f} | "
                     f"{r['p50_ms']:.0f} |")
    lines += ["", "Sample accepted reviews (the first request's best):", ""]
    lines += [f"- **{name}** ({r['sample']['p_positive']:.3f}): {r['sample']['text']}" for name, r in results.items()
              if r["sample"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.compare_generators", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", metavar="NAME=DIR",
                    help="a name and an exported artifacts directory, e.g. finetuned=artifacts rl=/tmp/artifacts-rl")
    ap.add_argument("--prompts", type=int, default=48, help="prompts, each sent once per generator (default: 48)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="folder with imdb/test.parquet for the prompts (default: $GLOWING_DATA_DIR or ../shared/data; "
                         "built-in example prompts when missing)")
    ap.add_argument("--out", type=Path, default=Path("reports/compare-generators"), help="output folder")
    args = ap.parse_args(argv)
    pairs = [item.partition("=") for item in args.artifacts]
    bad = [item for item, (name, sep, path) in zip(args.artifacts, pairs) if not sep or not name or
           not (Path(path) / "onnx").is_dir()]
    if bad:
        ap.error(f"expected NAME=DIR with an exported DIR/onnx, got {', '.join(bad)}")
    if args.prompts < 1:
        ap.error("--prompts must be >= 1")
    data_dir = args.data_dir if args.data_dir is not None else payloads.default_data_dir()
    prompts = payloads.sample(data_dir, n_prompts=args.prompts)["prompts"][: args.prompts]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {name: measure(name, Path(path), prompts, SETTINGS, args.out) for name, _, path in pairs}
    (args.out / "summary.json").write_text(json.dumps({"settings": SETTINGS, "prompts": prompts,
                                                       "results": results}, indent=2))
    text = report(results, SETTINGS, len(prompts))
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
