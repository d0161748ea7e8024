"""Load-test the served API: each scenario's server, a ladder of users, one report.

    .venv/bin/python -m loadtests.run --artifacts artifacts --out reports/loadtest     # `make loadtest`
    .venv/bin/python -m loadtests.run --scenarios engine,batching,no-batching --users 1,8,32 --duration 10
    .venv/bin/python -m loadtests.run --smoke --artifacts /tmp/tiny-artifacts --out /tmp/lt
    .venv/bin/python -m loadtests.run --workers 2 --scenarios engine --users 16,64   # a Locust master + 2 workers
    .venv/bin/python -m loadtests.run --scenarios engine,batching --before /tmp/old --users 16,32  # + an older checkout

For each scenario (a set of ``GLOWING_*`` settings) it starts ``bentoml serve`` on a free loopback
port, waits for ``/readyz``, runs headless Locust (its own CLI process) once per user count for
``--duration`` seconds, scrapes ``/metrics`` around every step (observed batch sizes), stops the
server, and finally writes ``summary.json``, ``report.md`` and PNG plots into ``--out``.

``--workers N`` (N >= 2) runs each step in Locust's distributed mode, for when one Locust process (one
core) cannot generate the load: a master on a free loopback port and N worker processes
(``loadtests/distributed.py``); the master merges the workers' statistics, so the report is the same,
and each step also records every worker's request count (``requests_by_worker``, which adds up to
``requests``). 0 or 1 (the default) = one Locust process, as before.

With ``GLOWING_API_KEY`` in the environment, each server requires it, and Locust and the ``/metrics``
scrapes send it. Every scenario raises ``GLOWING_MAX_CONCURRENCY`` to 256, above the top of the
ladder, so that the ladder measures the models and the batching, not the admission limit (which sheds
with 503).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from loadtests import distributed, payloads, report
from loadtests.server import ROOT, Server, descendants

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
MAX_CONCURRENCY = "256"

# name -> (GLOWING_* settings, what it shows). The baseline is the first: the defaults (onnx, fp32, the
# serving engine: zero-wait, length-aware scoring and iteration-level generation).
SCENARIOS: dict[str, tuple[dict[str, str], str]] = {
    "engine": ({}, "ONNX Runtime, fp32, GLOWING_BATCHING=engine (defaults): zero-wait scoring queue with "
               "length-aware model calls, iteration-level generation"),
    "batching": ({"GLOWING_BATCHING": "adaptive"}, "as engine, with BentoML's adaptive batching instead (the "
                 "serving path before the engine)"),
    # BentoML refuses max_batch_size 1 ("'max_batch_size' must be > 1") and has no switch that turns a
    # batchable method's dispatcher off: 2 is the least batching it serves.
    "no-batching": ({"GLOWING_BATCHING": "adaptive", "GLOWING_SCORER_MAX_BATCH_SIZE": "1",
                     "GLOWING_GENERATOR_MAX_BATCH_SIZE": "1"},
                    "as batching, with max_batch_size 1: adaptive batching off, one model call per request"),
    "torch": ({"GLOWING_BACKEND": "torch"}, "PyTorch backend, fp32, engine"),
    "int8": ({"GLOWING_CLASSIFIER_PRECISION": "int8"}, "ONNX Runtime, dynamic-int8 classifier "
             "(scores one text per model call by design), engine"),
}
BEFORE = "before"  # --before CHECKOUT: that checkout's service with its own defaults
ENDPOINTS = {"score": "ScoreUser", "generate": "GenerateUser", "reviews": "ReviewsUser"}
SMOKE = {"scenarios": "engine", "users": "1,4", "duration": 5}


def cpu_seconds(server: Server) -> dict[str, float]:
    """CPU seconds used so far by each process of the server, by role (``glowing``, ``glowing-scorer``,
    ``glowing-generator``, ``arbiter``), and by this process's finished children (the Locust runs)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        role = "arbiter"
        if b"--service-name" in args:
            role = args[args.index(b"--service-name") + 1].decode()
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["locust"] = usage.ru_utime + usage.ru_stime
    return out


def batch_histogram(metrics: str, model: str) -> dict[str, float]:
    """sum and count of ``glowing_batch_size{model=...}`` from a Prometheus text page."""
    out = {"sum": 0.0, "count": 0.0}
    for key in out:
        m = re.search(rf'^glowing_batch_size_{key}\{{[^}}]*model="{model}"[^}}]*\}} ([0-9.eE+-]+)$', metrics, re.M)
        if m:
            out[key] = float(m.group(1))
    return out


def gc_pauses(metrics: str) -> dict[str, dict[str, float]]:
    """Per service process, count and sum (seconds) of ``glowing_gc_full_collection_seconds``: its full
    garbage collections, each a pause of that process (absent on a server without the metric)."""
    out: dict[str, dict[str, float]] = {}
    for key, service, value in re.findall(r'^glowing_gc_full_collection_seconds_(sum|count)\{[^}]*service="([^"]+)"'
                                          r'[^}]*\} ([0-9.eE+-]+)$', metrics, re.M):
        out.setdefault(service, {})[key] = float(value)
    return out


def run_locust(url: str, user_class: str, users: int, duration: int, prefix: Path, env: dict[str, str],
               log: Path, workers: int = 0) -> int:
    """One headless Locust run; with ``workers`` >= 2 a master and that many workers (``log``: the master's)."""
    base = [str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE), user_class, "--host", url,
            "--loglevel", "WARNING"]
    headless = ["--headless", "-u", str(users), "-r", str(users), "-t", f"{duration}s", "--stop-timeout", "10",
                "--csv", str(prefix), "--json-file", str(prefix), "--only-summary"]
    if workers >= 2:
        return distributed.run(base, headless, workers, prefix, {**os.environ, **env}, log,
                               timeout=duration + 90 + distributed.WORKERS_WAIT_S)
    with open(log, "wb") as out:
        proc = subprocess.run(base + headless, cwd=ROOT, env={**os.environ, **env}, stdout=out,
                              stderr=subprocess.STDOUT, timeout=duration + 90)
    return proc.returncode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path(os.environ.get("GLOWING_ARTIFACTS", "artifacts")),
                    help="artifacts folder the service serves (GLOWING_ARTIFACTS; default: artifacts)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma list of scenarios, the first one is the baseline of the ratios; known: "
                    + "; ".join(f"{k} = {v[1]}" for k, v in SCENARIOS.items())
                    + f"; {BEFORE} = the service of --before's checkout (default: all but {BEFORE})")
    ap.add_argument("--before", type=Path, default=None, metavar="CHECKOUT",
                    help="also serve another Glowing checkout, e.g. `git worktree add /tmp/old <commit>` of the "
                    "commit an issue was filed against, with its own defaults, as scenario "
                    f"'{BEFORE}' (last, unless --scenarios places it): its serving path measured in the same "
                    "run, on the same artifacts, against today's")
    ap.add_argument("--users", default="1,4,16,32,64",
                    help="ladder of concurrent Locust users, one step each (default: 1,4,16,32,64)")
    ap.add_argument("--duration", type=int, default=15, help="seconds per step (default: 15)")
    ap.add_argument("--endpoint", default="score", choices=list(ENDPOINTS),
                    help="the endpoint under load: score (default), generate or reviews")
    ap.add_argument("--wait", default="0", help="seconds each user waits between requests: 0 (default, "
                    "closed loop) or a range like 0.5-2 (LOADTEST_WAIT)")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with imdb/test.parquet for the payloads "
                    "(default: $GLOWING_DATA_DIR or ../shared/data; built-in examples when missing)")
    ap.add_argument("--workers", type=int, default=0, help="Locust worker processes: 0 or 1 (default) = one "
                    "Locust process; N >= 2 = Locust's distributed mode, a master and N workers on loopback, for "
                    "when one process (one core) cannot generate the load")
    ap.add_argument("--out", type=Path, default=Path("reports/loadtest"),
                    help="output folder: summary.json, report.md, *.png, raw/ (default: reports/loadtest)")
    ap.add_argument("--smoke", action="store_true", help="a quick check, under a minute: scenario engine, "
                    f"users {SMOKE['users']}, {SMOKE['duration']} s steps (overrides those three flags)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.scenarios, args.users, args.duration = SMOKE["scenarios"], SMOKE["users"], SMOKE["duration"]
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenario_list if s not in SCENARIOS and s != BEFORE]
    if unknown or not args.scenario_list:
        ap.error(f"--scenarios: unknown {unknown}; known: {', '.join(SCENARIOS)}, {BEFORE} (with --before)")
    if args.before is not None:
        if not (args.before / "service" / "service.py").is_file():
            ap.error(f"--before: {args.before} is not a Glowing checkout (no service/service.py)")
        if BEFORE not in args.scenario_list:
            args.scenario_list.append(BEFORE)
    elif BEFORE in args.scenario_list:
        ap.error(f"--scenarios: '{BEFORE}' needs --before CHECKOUT")
    try:
        args.user_list = [int(u) for u in args.users.split(",")]
        assert args.user_list and all(u >= 1 for u in args.user_list)
    except (ValueError, AssertionError):
        ap.error(f"--users: a comma list of positive integers, got {args.users!r}")
    if args.duration < 1:
        ap.error("--duration: at least 1 second")
    if args.workers < 0:
        ap.error(f"--workers: 0 or more, got {args.workers}")
    if not (args.artifacts / "manifest.json").is_file():
        ap.error(f"--artifacts: {args.artifacts} has no manifest.json (make models && make export)")
    return args


def checkout_commit(checkout: Path) -> str:
    """The short commit of a git checkout, with "+changes" when its tracked files differ from it."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(checkout), *cmd], capture_output=True, text=True).stdout.strip()
        except OSError:  # no git on this machine
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    out: Path = args.out
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    payload_file = raw / "payloads.json"
    pl = payloads.write(payload_file, args.data_dir)
    locust_env = {"LOADTEST_PAYLOADS": str(payload_file.resolve()), "LOADTEST_WAIT": args.wait}
    user_class = ENDPOINTS[args.endpoint]
    started = time.time()
    results = []
    for name in args.scenario_list:
        if name == BEFORE:
            env, description = {}, f"the service of {args.before} (git {checkout_commit(args.before)}), its defaults"
        else:
            env, description = SCENARIOS[name]
        checkout = {"checkout": description} if name == BEFORE else {}  # the report's settings column
        server = Server(args.artifacts.resolve(), raw / f"{name}_serve.log",
                        {"GLOWING_MAX_CONCURRENCY": MAX_CONCURRENCY, **env},
                        cwd=args.before.resolve() if name == BEFORE else ROOT)
        try:
            try:
                ready_s = server.wait_ready()
            except RuntimeError as e:  # record it and go on with the other scenarios
                print(f"[{name}] did not start: {e}", flush=True)
                results.append({"name": name, "env": env, "description": description, "ready_s": None,
                                "error": str(e)[-2000:], "steps": [], **checkout})
                continue
            print(f"[{name}] ready after {ready_s:.1f} s on {server.url}", flush=True)
            steps = []
            for users in args.user_list:
                prefix = raw / f"{name}_{args.endpoint}_u{users}"
                page = server.metrics()
                before = batch_histogram(page, "classifier"), batch_histogram(page, "generator")
                gc_before = gc_pauses(page)
                cpu_before, t0 = cpu_seconds(server), time.monotonic()
                rc = run_locust(server.url, user_class, users, args.duration, prefix, locust_env,
                                Path(f"{prefix}_locust.log"), args.workers)
                cpu_after, wall = cpu_seconds(server), time.monotonic() - t0
                page = server.metrics()
                after = batch_histogram(page, "classifier"), batch_histogram(page, "generator")
                gc_after = gc_pauses(page)
                step = report.read_step(prefix, args.endpoint)
                step["requests_by_worker"] = (distributed.worker_requests(prefix, args.workers, args.endpoint)
                                              if args.workers >= 2 else [step["requests"]])
                step["cpu_ms_per_request"] = {role: round((cpu_after[role] - cpu_before.get(role, 0.0))
                                                         / max(step["requests"], 1) * 1000, 2)
                                             for role in cpu_after}  # CPU ms per request, by process
                step["cpu_cores_busy"] = round(sum(cpu_after[r] - cpu_before.get(r, 0.0) for r in cpu_after) / wall, 2)
                step.update(users=users, locust_rc=rc, batches={
                    model: {"batches": a["count"] - b["count"], "items": a["sum"] - b["sum"],
                            "mean": round((a["sum"] - b["sum"]) / (a["count"] - b["count"]), 2)
                            if a["count"] > b["count"] else None}
                    for model, b, a in zip(("classifier", "generator"), before, after)})
                step["gc"] = {service: {"collections": int(a.get("count", 0) - gc_before.get(service, {}).get("count", 0)),
                                        "ms": round(1000 * (a.get("sum", 0) - gc_before.get(service, {}).get("sum", 0)), 1)}
                              for service, a in gc_after.items()}  # full collections during the step
                steps.append(step)
                print(f"[{name}] {users:>3} users: {step['rps']:.1f} req/s, p50 {step['p50']} ms, "
                      f"p95 {step['p95']} ms, p99 {step['p99']} ms, {step['requests']} requests, "
                      f"{step['failures']} failed ({step['shed']} shed), mean classifier batch "
                      f"{step['batches']['classifier']['mean']}", flush=True)
                if sum(step["requests_by_worker"]) != step["requests"]:
                    print(f"[{name}] {users:>3} users: the workers reported {step['requests_by_worker']} requests, "
                          f"the master counted {step['requests']}", flush=True)
            results.append({"name": name, "env": env, "description": description, "ready_s": round(ready_s, 1),
                            "steps": steps, **checkout})
        finally:
            server.stop()
    summary = {
        "endpoint": args.endpoint, "users": args.user_list, "duration_s": args.duration, "wait": args.wait,
        "workers": args.workers if args.workers >= 2 else 0,
        "max_concurrency": int(MAX_CONCURRENCY), "artifacts": str(args.artifacts),
        "payloads": {"source": pl["source"], "texts": len(pl["texts"]), "prompts": len(pl["prompts"])},
        "machine": machine(),
        "command": "python -m loadtests.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 1), "scenarios": results,
    }
    report.write(summary, out)
    print(f"report: {out / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
