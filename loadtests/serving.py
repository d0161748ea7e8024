"""What a user of the HTTP API feels, with the serving engine and with the path before it, side by side.

    .venv/bin/python -m loadtests.serving --artifacts artifacts --out reports/serving     # `make bench-serving`
    .venv/bin/python -m loadtests.serving --smoke --artifacts /tmp/tiny --out /tmp/serving   # under 2 min

For each mode (``GLOWING_BATCHING=adaptive``: BentoML's adaptive batching, the old path; ``engine``: the
iteration-level engine and the zero-wait scoring queue) it starts ``bentoml serve`` on a free loopback
port, all at once, and measures over HTTP from one asyncio client process (aiohttp), the modes taking
turns part by part and ladder step by ladder step (an idle server costs nothing):

1. **Lone requests** (one at a time, medians of ``--lone`` each): ``/generate`` of 8 and of 48 new
   tokens and ``/score`` of one short text; before and after a ``--burst``-second burst of 32
   concurrent clients (half ``/generate``, half ``/score``). The same calls in-process through
   ``glowing.runtime`` (generate, then score the text) are the floor.
2. **A ladder** of closed-loop clients on ``/generate`` (n 4, ``max_new_tokens`` drawn from 16-128 per
   request, seeded): requests/s, p50 and p99; then the same ladder streaming (``"stream": true``) for
   the time to the first token (the old path streams nothing: its first token comes with the last).
3. **Cancellation**: 12 heavy ``/reviews`` (n 16, min_positive 1.0, 128 candidates of 256 tokens) whose
   clients leave after 0.5 s; the server's CPU (all its processes, from /proc) every 0.1 s after they
   left, the time until it is idle, the CPU-seconds spent on nobody, and the engine's running-rows gauge.

Writes ``summary.json``, ``report.md`` (tables, old and new side by side, ratios) and ``serving.png``.
The machine is shared and noisy: compare the two modes of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import sys
import time
from pathlib import Path

from loadtests import payloads
from loadtests.run import machine
from loadtests.server import ROOT, Server, descendants

MODES = {"adaptive": {"GLOWING_BATCHING": "adaptive"}, "engine": {"GLOWING_BATCHING": "engine"},
         "engine-int8": {"GLOWING_BATCHING": "engine", "GLOWING_GENERATOR_PRECISION": "int8"},
         "engine-1t": {"GLOWING_BATCHING": "engine", "GLOWING_THREADS": "1"},
         "engine-int8-1t": {"GLOWING_BATCHING": "engine", "GLOWING_GENERATOR_PRECISION": "int8", "GLOWING_THREADS": "1"}}
BEFORE = "before"  # --before CHECKOUT: the engine served from another checkout (an older commit's code)
SHORT_TEXT = "A wonderful, moving film."
GEN_BODY = {"prompt": "This movie", "n": 1, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": 7}
HEAVY = {"prompt": "This movie", "n": 16, "min_positive": 1.0, "max_candidates": 128, "max_new_tokens": 256}
SMOKE = {"users": [1, 4], "duration": 4, "lone": 5, "burst": 4, "heavy": 3}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def server_cpu(server: Server) -> float:
    """CPU-seconds used so far by every process of the server."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Client:
    def __init__(self, url: str, headers: dict[str, str]):
        import aiohttp

        self.url = url
        self.session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=300),
                                             connector=aiohttp.TCPConnector(limit=0))

    async def post(self, path: str, body: dict) -> tuple[int, float]:
        started = time.perf_counter()
        async with self.session.post(self.url + path, json=body) as resp:
            await resp.read()
            return resp.status, (time.perf_counter() - started) * 1e3

    async def stream(self, body: dict) -> tuple[int, float | None, float]:
        """Status, ms to the first token delta, ms to the end of the stream."""
        started = time.perf_counter()
        first = None
        async with self.session.post(self.url + "/generate", json={**body, "stream": True}) as resp:
            async for line in resp.content:
                if first is None and line.startswith(b"data: {") and b'"delta"' in line:
                    first = (time.perf_counter() - started) * 1e3
            return resp.status, first, (time.perf_counter() - started) * 1e3

    async def close(self) -> None:
        await self.session.close()


async def lone(client: Client, repeats: int) -> dict[str, float]:
    out = {}
    for name, path, body in (("generate_8", "/generate", {**GEN_BODY, "max_new_tokens": 8}),
                             ("generate_48", "/generate", {**GEN_BODY, "max_new_tokens": 48}),
                             ("score_1", "/score", {"texts": [SHORT_TEXT]})):
        times = []
        for _ in range(repeats):
            status, ms = await client.post(path, body)
            if status == 200:
                times.append(ms)
        out[name] = round(statistics.median(times), 1) if times else None
    return out


async def closed_loop(client: Client, users: int, duration: float, make, streaming: bool = False,
                      server: Server | None = None) -> dict:
    """``users`` clients, each sending ``make(rng)`` bodies back to back for ``duration`` seconds;
    with ``server``, also the tokens/s its engine generated meanwhile (its token counter, read at the
    start and at the end of the window)."""
    end = time.perf_counter() + duration
    tokens_at_start = await asyncio.to_thread(generated_tokens, server) if server else None
    done: list[tuple[float, float, float | None]] = []  # (finished at, ms, ttft ms)
    failures = 0

    async def user(i: int) -> None:
        nonlocal failures
        rng = random.Random(i)
        while time.perf_counter() < end:
            path, body = make(rng)
            try:
                if streaming:
                    status, ttft, ms = await client.stream(body)
                else:
                    (status, ms), ttft = await client.post(path, body), None
            except Exception:
                status, ms, ttft = 0, 0.0, None
            if status == 200:
                done.append((time.perf_counter(), ms, ttft))
            else:
                failures += 1

    async def tokens_at_end() -> float | None:
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        return await asyncio.to_thread(generated_tokens, server) if server else None

    started = time.perf_counter()
    *_, tokens_end = await asyncio.gather(*(user(i) for i in range(users)), tokens_at_end())
    in_window = [d for d in done if d[0] <= end]
    ms = [d[1] for d in in_window]
    ttft = [d[2] for d in in_window if d[2] is not None]
    return {"users": users, "requests": len(in_window), "failures": failures,
            "rps": round(len(in_window) / (end - started), 2), "p50": _r(percentile(ms, 50)),
            "p99": _r(percentile(ms, 99)), "ttft_p50": _r(percentile(ttft, 50)), "ttft_p99": _r(percentile(ttft, 99)),
            # None where the counter did not move while requests were answered: a mode without the engine
            "tokens_per_s": round((tokens_end - tokens_at_start) / (end - started), 1)
            if tokens_end is not None and tokens_at_start is not None
            and (tokens_end > tokens_at_start or not in_window) else None}


def generated_tokens(server: Server) -> float | None:
    """The engine's ``glowing_generation_tokens_total`` (None without the engine)."""
    found = re.findall(r"^glowing_generation_tokens_total (\S+)", server.metrics(), re.M)
    return float(found[0]) if found else None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def generate_body(rng: random.Random) -> tuple[str, dict]:
    return "/generate", {"prompt": "This movie", "n": 4, "max_new_tokens": rng.randint(16, 128),
                         "seed": rng.randrange(2**31)}


async def cancellation(server: Server, client: Client, heavy: int) -> dict:
    """``heavy`` /reviews that are abandoned after 0.5 s; the server's CPU afterwards."""
    async def abandoned() -> None:
        try:
            await asyncio.wait_for(client.post("/reviews", HEAVY), 0.5)
        except asyncio.TimeoutError:
            pass

    await asyncio.gather(*(abandoned() for _ in range(heavy)))
    left = time.perf_counter()
    samples, cpu0, idle_at, last = [], server_cpu(server), None, server_cpu(server)
    while time.perf_counter() - left < 30:
        await asyncio.sleep(0.1)
        now, cpu = time.perf_counter() - left, server_cpu(server)
        rate = (cpu - last) / 0.1
        last = cpu
        samples.append((round(now, 2), round(rate, 2)))
        if idle_at is None and len(samples) >= 3 and all(r < 0.1 for _, r in samples[-3:]):
            idle_at = samples[-3][0]  # three quiet samples in a row: under 10% of a core
        if idle_at is not None and now > idle_at + 1:
            break
    running = re.findall(r"^glowing_num_requests_running (\S+)", server.metrics(), re.M)
    return {"abandoned": heavy, "idle_after_s": idle_at, "cpu_s_after_leaving": round(last - cpu0, 2),
            "observed_s": samples[-1][0], "running_rows_gauge": float(running[0]) if running else None,
            "cpu_cores_by_time": samples}


def in_process(artifacts: Path, repeats: int) -> dict[str, float]:
    """The same lone calls without HTTP: generate (then score the text), and score."""
    from glowing.runtime import SamplingSettings, load_generator, load_scorer
    from service.batching import derive_seed  # the seed the API gives row 0 of GEN_BODY: the same tokens

    gen = load_generator(artifacts / "onnx" / "generator", "onnx", "cpu")
    scorer = load_scorer(artifacts / "onnx" / "classifier", "onnx", "cpu")

    def settings(tokens: int, seed: int) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=tokens, temperature=1.0, top_p=0.95, top_k=50,
                                seed=derive_seed(seed, 0))

    # A seed whose review runs to 48 tokens without ending: "8" and "48" then mean 8 and 48 steps.
    GEN_BODY["seed"] = next((seed for seed in range(200)
                             if len(gen.generate_ids([GEN_BODY["prompt"]], settings(48, seed))[0]) == 48), 7)
    out = {"seed": GEN_BODY["seed"]}
    for tokens in (8, 48):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            text = GEN_BODY["prompt"] + gen.generate([GEN_BODY["prompt"]], settings(tokens, GEN_BODY["seed"]))[0]
            scorer.score([text])
            times.append((time.perf_counter() - t) * 1e3)
        out[f"generate_{tokens}"] = round(statistics.median(times), 1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        scorer.score([SHORT_TEXT])
        times.append((time.perf_counter() - t) * 1e3)
    out["score_1"] = round(statistics.median(times), 2)
    return out


async def measure(servers: dict[str, Server], args: argparse.Namespace, texts: list[str]) -> dict:
    """Every part for every mode, the modes alternating part by part (ladder: step by step), so that
    load from elsewhere on a shared machine falls on both alike."""
    clients = {mode: Client(srv.url, srv.headers) for mode, srv in servers.items()}
    results: dict[str, dict] = {mode: {"ladder": [], "stream": []} for mode in servers}
    try:
        for client in clients.values():
            for _ in range(3):  # warm-up: first connections, first calls
                await client.post("/generate", {**GEN_BODY, "max_new_tokens": 8})
                await client.post("/score", {"texts": [SHORT_TEXT]})
        for mode, client in clients.items():
            results[mode]["lone_before"] = await lone(client, args.lone)
            print(f"[{mode}] lone before: {results[mode]['lone_before']}", flush=True)

        def burst_body(rng: random.Random) -> tuple[str, dict]:
            if rng.random() < 0.5:
                return generate_body(rng)
            return "/score", {"texts": [rng.choice(texts)]}

        for mode, client in clients.items():
            results[mode]["burst"] = await closed_loop(client, 32, args.burst, burst_body)
            results[mode]["lone_after"] = await lone(client, args.lone)
            print(f"[{mode}] burst {results[mode]['burst']['rps']} req/s; lone after: {results[mode]['lone_after']}",
                  flush=True)
        for streaming, key in ((False, "ladder"), (True, "stream")):
            for users in args.user_list:
                for mode, client in clients.items():
                    step = await closed_loop(client, users, args.duration, generate_body, streaming=streaming,
                                             server=servers[mode])
                    results[mode][key].append(step)
                    print(f"[{mode}] {'stream' if streaming else '/generate':<9} {users:>3} clients: {step['rps']} req/s, "
                          f"p50 {step['p50']} ms, p99 {step['p99']} ms, TTFT p50 {step['ttft_p50']} ms, "
                          f"{step['failures']} failed", flush=True)
        for mode, client in clients.items():
            cancel = await cancellation(servers[mode], client, args.heavy)
            if mode == "adaptive":
                cancel["running_rows_gauge"] = None  # no engine: the gauge is never set
            results[mode]["cancellation"] = cancel
            print(f"[{mode}] cancellation: idle after {cancel['idle_after_s']} s, {cancel['cpu_s_after_leaving']} "
                  f"CPU-s after the clients left, running rows {cancel['running_rows_gauge']}", flush=True)
        return results
    finally:
        for client in clients.values():
            await client.close()


def compare(results: dict, floor: dict) -> dict:
    old, new = results.get("adaptive"), results.get("engine")
    if not (old and new):
        return {}
    out = {"lone": {}, "ladder": {}}
    for name in ("generate_8", "generate_48", "score_1"):
        out["lone"][name] = {
            "in_process_ms": floor[name],
            **{f"{mode}_{when}": results[mode][f"lone_{when}"][name] for mode in results for when in ("before", "after")},
            "engine_after_over_before": _ratio(new["lone_after"][name], new["lone_before"][name]),
            "engine_before_minus_in_process_ms": _r(new["lone_before"][name] - floor[name])
            if new["lone_before"][name] is not None else None}
    for a, b, sa, sb in zip(old["ladder"], new["ladder"], old["stream"], new["stream"]):
        out["ladder"][str(a["users"])] = {"rps_ratio": _ratio(b["rps"], a["rps"]), "p99_ratio": _ratio(b["p99"], a["p99"]),
                                          "ttft_p50": [sa["ttft_p50"], sb["ttft_p50"]]}
    return out


def _ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def markdown(summary: dict) -> str:
    m, res, cmp_ = summary["machine"], summary["modes"], summary["compare"]
    lines = ["# Serving: the engine and the path before it, over HTTP", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}", f"- command: `{summary['command']}`",
             f"- started {summary['started']}, took {summary['elapsed_s']:.0f} s; one client process (aiohttp) on the "
             "same cores as the server", ""]
    if cmp_:
        lines += ["## Lone requests (median ms): before and after a burst of 32 clients", "",
                  "| request | in-process | adaptive before | adaptive after | engine before | engine after | "
                  "engine after / before |", "|---|---|---|---|---|---|---|"]
        for name, row in cmp_["lone"].items():
            lines.append(f"| {name} | {row['in_process_ms']} | {row['adaptive_before']} | {row['adaptive_after']} | "
                         f"{row['engine_before']} | {row['engine_after']} | {row['engine_after_over_before']} |")
        lines += ["", "## /generate (n 4, 16-128 new tokens), closed-loop clients", "",
                  "| clients | adaptive req/s | engine req/s | ratio | adaptive p50 / p99 ms | engine p50 / p99 ms | "
                  "p99 ratio | TTFT p50 ms adaptive / engine (streaming) |", "|---|---|---|---|---|---|---|---|"]
        for a, b in zip(res["adaptive"]["ladder"], res["engine"]["ladder"]):
            row = cmp_["ladder"][str(a["users"])]
            lines.append(f"| {a['users']} | {a['rps']} | {b['rps']} | {row['rps_ratio']}x | {a['p50']} / {a['p99']} | "
                         f"{b['p50']} / {b['p99']} | {row['p99_ratio']} | {row['ttft_p50'][0]} / {row['ttft_p50'][1]} |")
        lines += ["", "## Abandoned requests", "",
                  "| mode | abandoned | CPU-s spent after the clients left | idle after (s) | running rows gauge |",
                  "|---|---|---|---|---|"]
        for mode in ("adaptive", "engine"):
            c = res[mode]["cancellation"]
            idle = c["idle_after_s"] if c["idle_after_s"] is not None else f"not within {c['observed_s']}"
            lines.append(f"| {mode} | {c['abandoned']} | {c['cpu_s_after_leaving']} | {idle} | {c['running_rows_gauge']} |")
    modes = list(res)
    lines += ["", "## /generate ladder, every mode (req/s, generated tokens/s from the engine's counter, p50 / p99 ms)",
              "", "| clients | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for i, step in enumerate(res[modes[0]]["ladder"]):
        cells = []
        for mode in modes:
            s_ = res[mode]["ladder"][i]
            tokens = f"{s_['tokens_per_s']:.0f} tok/s, " if s_.get("tokens_per_s") is not None else ""
            cells.append(f"{s_['rps']} req/s, {tokens}{s_['p50']} / {s_['p99']}")
        lines.append(f"| {step['users']} | " + " | ".join(cells) + " |")
    if len(modes) > 1 and all(st.get("tokens_per_s") for st in res[modes[0]]["ladder"]):
        base = modes[0]
        lines += ["", f"Ratios to {base} (tokens/s): " + "; ".join(
            f"{s_['users']} clients: " + ", ".join(
                f"{m} {_ratio(res[m]['ladder'][i]['tokens_per_s'], s_['tokens_per_s']) or 'n/a '}x"
                for m in modes[1:])
            for i, s_ in enumerate(res[base]["ladder"]))]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode, res in summary["modes"].items():
        users = [s["users"] for s in res["ladder"]]
        axes[0].plot(users, [s["rps"] for s in res["ladder"]], marker="o", label=mode)
        axes[1].plot(users, [s["p99"] for s in res["ladder"]], marker="o", label=mode)
        axes[2].plot(*zip(*res["cancellation"]["cpu_cores_by_time"]), label=mode)
    for ax, title in zip(axes, ("/generate req/s", "/generate p99 ms", "server CPU (cores) after 12 clients left")):
        ax.set_title(title)
        ax.legend()
    axes[0].set_xlabel("clients")
    axes[1].set_xlabel("clients")
    axes[2].set_xlabel("seconds after the clients left")
    fig.tight_layout()
    fig.savefig(out / "serving.png", dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtests.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path(os.environ.get("GLOWING_ARTIFACTS", "artifacts")),
                    help="artifacts folder with onnx/ (default: $GLOWING_ARTIFACTS or artifacts)")
    ap.add_argument("--modes", default="adaptive,engine", help="comma list of modes to serve, one server each: "
                    "adaptive, engine (GLOWING_BATCHING), engine-int8 (the engine with the int8 generator), engine-1t and "
                    "engine-int8-1t (the same at GLOWING_THREADS=1) "
                    "(default: adaptive,engine)")
    ap.add_argument("--before", type=Path, default=None, metavar="CHECKOUT",
                    help="also serve the engine from another checkout of Glowing (e.g. `git worktree add /tmp/old "
                         "<commit>`), as mode 'before', first in the list: the served before/after of a change")
    ap.add_argument("--before-artifacts", type=Path, default=None, metavar="DIR",
                    help="the artifacts the 'before' server serves (default: --artifacts), e.g. an export made "
                         "by that checkout")
    ap.add_argument("--users", default="1,4,16,32,64", help="ladder of concurrent clients (default: 1,4,16,32,64)")
    ap.add_argument("--duration", type=float, default=15, help="seconds per ladder step (default: 15)")
    ap.add_argument("--lone", type=int, default=15, help="lone requests of each kind, before and after the "
                    "burst; the median is reported (default: 15)")
    ap.add_argument("--burst", type=float, default=20, help="seconds of the 32-client burst (default: 20)")
    ap.add_argument("--heavy", type=int, default=12, help="abandoned heavy /reviews (default: 12)")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with imdb/test.parquet for the /score "
                    "texts of the burst (default: $GLOWING_DATA_DIR or ../shared/data; built-in examples)")
    ap.add_argument("--out", type=Path, default=Path("reports/serving"), help="output folder (default: reports/serving)")
    ap.add_argument("--smoke", action="store_true", help=f"a quick check: clients {SMOKE['users']}, "
                    f"{SMOKE['duration']} s steps, short burst, {SMOKE['heavy']} abandoned requests")
    args = ap.parse_args(argv)
    if args.smoke:
        args.users = ",".join(map(str, SMOKE["users"]))
        args.duration, args.lone, args.burst, args.heavy = SMOKE["duration"], SMOKE["lone"], SMOKE["burst"], SMOKE["heavy"]
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or any(m not in MODES for m in args.mode_list):
        ap.error(f"--modes: choose from {', '.join(MODES)}, got {args.modes!r}")
    if args.before is not None:
        if not (args.before / "service" / "service.py").is_file():
            ap.error(f"--before: {args.before} is not a Glowing checkout (no service/service.py)")
        args.mode_list.insert(0, BEFORE)
    try:
        args.user_list = [int(u) for u in args.users.split(",")]
        assert args.user_list and all(u >= 1 for u in args.user_list)
    except (ValueError, AssertionError):
        ap.error(f"--users: a comma list of positive integers, got {args.users!r}")
    if args.duration <= 0 or args.lone < 1 or args.burst <= 0 or args.heavy < 0:
        ap.error("--duration and --burst must be > 0, --lone >= 1, --heavy >= 0")
    if not (args.artifacts / "onnx" / "parity.json").is_file():
        ap.error(f"--artifacts: {args.artifacts} has no onnx/ export (make models && make export)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    args.out.mkdir(parents=True, exist_ok=True)
    texts = payloads.sample(args.data_dir if args.data_dir else payloads.default_data_dir())["texts"]
    started = time.time()
    floor = in_process(args.artifacts, args.lone)
    print(f"in-process (ms): {floor}", flush=True)
    servers = {}
    try:
        for mode in args.mode_list:  # all up at once: the modes alternate, part by part
            before = mode == BEFORE
            artifacts = (args.before_artifacts or args.artifacts) if before else args.artifacts
            servers[mode] = Server(artifacts.resolve(), args.out / f"{mode}_serve.log",
                                   {**MODES["engine" if before else mode], "GLOWING_MAX_CONCURRENCY": "256",
                                    "GLOWING_MAX_N": "16", "GLOWING_MAX_CANDIDATES": "128"},
                                   cwd=args.before.resolve() if before else ROOT)
        for mode, server in servers.items():
            print(f"[{mode}] ready after {server.wait_ready():.1f} s on {server.url}", flush=True)
        results = asyncio.run(measure(servers, args, texts))
    finally:
        for server in servers.values():
            server.stop()
    summary = {"machine": machine(), "command": "python -m loadtests.serving " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
               "elapsed_s": round(time.time() - started, 1), "in_process_ms": floor, "modes": results,
               "compare": compare(results, floor)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "report.md").write_text(markdown(summary))
    plot(summary, args.out)
    print(f"report: {args.out / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
