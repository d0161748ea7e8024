"""Soak test: Locust at the saturation load for a long time, watching every server process's memory.

    flock /tmp/glowing-heavy.lock .venv/bin/python -m loadtests.soak --artifacts artifacts --out reports/soak
    .venv/bin/python -m loadtests.soak --duration 60 --warmup 10 --window 20 --users 4   # a quick look (1.5 min)

Default: 16 closed-loop ``ScoreUser``s (the saturation load of ``/score`` on the cpu-preset models,
docs/LOADTESTS.md) for 660 s, about 12 minutes with start-up. It starts ``bentoml serve`` with the default
settings on a free loopback port, runs headless Locust (its own CLI process), samples the resident
memory (RSS) of every server process by role (``glowing``, ``glowing-scorer``, ``glowing-generator``,
``arbiter``) every ``--sample-every`` seconds, and writes ``soak.json`` and ``soak.png`` into ``--out``.

RSS growth is the mean total RSS over the last ``--window`` seconds against the mean over the first
``--window`` seconds after ``--warmup``: ONNX Runtime's memory arena grows until it has seen the largest
batch shapes, which took about two minutes at 16 users. The growth since the first sample (before any
request) is reported too. It prints the growth, the request and failure counts, and exits 1 when growth
reaches ``--max-growth`` percent, a request failed with anything but a shed 503, or an ordinary request
after the load fails. With ``GLOWING_API_KEY`` set, the server requires it and Locust sends it.

Every run so far, with its figures and machine, and the leak it found (fixed in
service/bentoml_compat.py, workaround "timeout-timers"): docs/LOADTESTS.md, "Soak".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from loadtests import payloads, report
from loadtests.run import ENDPOINTS, LOCUSTFILE, machine
from loadtests.server import ROOT, Server, descendants


def rss_by_role(server: Server) -> dict[str, float]:
    """Resident memory in MiB of each server process, summed by role."""
    out: dict[str, float] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        role = args[args.index(b"--service-name") + 1].decode() if b"--service-name" in args else "arbiter"
        out[role] = out.get(role, 0.0) + resident / 2**20
    return out


def after_load_status(server: Server) -> int:
    """Status of one ordinary ``/score`` request once the load has stopped."""
    req = urllib.request.Request(f"{server.url}/score", data=json.dumps({"texts": ["Still serving?"]}).encode(),
                                 headers={"Content-Type": "application/json", **server.headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def growth(samples: list[dict], warmup: float, window: float) -> dict:
    """Mean total RSS in ``[warmup, warmup + window)`` against the last ``window`` seconds."""
    end = samples[-1]["t"]
    first = [s["total"] for s in samples if warmup <= s["t"] < warmup + window]
    last = [s["total"] for s in samples if s["t"] > end - window]
    if not first or not last:
        return {"start_mib": None, "end_mib": None, "growth_pct": None}
    start_mib, end_mib = statistics.fmean(first), statistics.fmean(last)
    first_mib = samples[0]["total"]
    return {"start_mib": round(start_mib, 1), "end_mib": round(end_mib, 1),
            "growth_pct": round((end_mib - start_mib) / start_mib * 100, 2), "first_sample_mib": first_mib,
            "growth_from_first_sample_pct": round((end_mib - first_mib) / first_mib * 100, 2),
            "max_mib": round(max(s["total"] for s in samples), 1)}


def plot(samples: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = sorted({r for s in samples for r in s["rss"]})
    t = [s["t"] / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, [s["total"] for s in samples], label="total", color="black", linewidth=2)
    for role in roles:
        ax.plot(t, [s["rss"].get(role, 0.0) for s in samples], label=role)
    ax.axvspan(result["warmup_s"] / 60, (result["warmup_s"] + result["window_s"]) / 60, color="grey", alpha=0.15,
               label="baseline window")
    g, r = result["rss"], result["requests"]
    ax.set(xlabel="minutes under load", ylabel="resident memory (MiB)", ylim=(0, None),
           title=f"Soak: {result['users']} users on /{result['endpoint']}, {r['requests']} requests, "
                 f"{r['failures']} failed ({r['shed']} shed); RSS growth {g['growth_pct']}%")
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path(os.environ.get("GLOWING_ARTIFACTS", "artifacts")),
                    help="artifacts folder the service serves (GLOWING_ARTIFACTS; default: artifacts)")
    ap.add_argument("--users", type=int, default=16, help="concurrent closed-loop Locust users (default: 16)")
    ap.add_argument("--duration", type=int, default=660, help="seconds of load (default: 660)")
    ap.add_argument("--endpoint", default="score", choices=list(ENDPOINTS), help="endpoint under load (default: score)")
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples (default: 5)")
    ap.add_argument("--warmup", type=float, default=120.0, help="seconds of load before the baseline window "
                    "(default: 120)")
    ap.add_argument("--window", type=float, default=60.0, help="seconds averaged at the start and at the end "
                    "(default: 60)")
    ap.add_argument("--max-growth", type=float, default=10.0, help="RSS growth (%%) that fails the run (default: 10)")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with imdb/test.parquet for the payloads "
                    "(default: $GLOWING_DATA_DIR or ../shared/data; built-in examples when missing)")
    ap.add_argument("--out", type=Path, default=Path("reports/soak"), help="output folder (default: reports/soak)")
    args = ap.parse_args(argv)
    if args.duration < args.warmup + 2 * args.window:
        ap.error(f"--duration must cover --warmup and two windows ({args.warmup + 2 * args.window:.0f} s)")
    if not (args.artifacts / "manifest.json").is_file():
        ap.error(f"--artifacts: {args.artifacts} has no manifest.json (make models && make export)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    pl = payloads.write(out / "payloads.json", args.data_dir)
    prefix = out / "locust"
    server = Server(args.artifacts.resolve(), out / "serve.log")
    samples: list[dict] = []
    started = time.time()
    try:
        ready_s = server.wait_ready()
        print(f"ready after {ready_s:.1f} s on {server.url}; {args.users} users for {args.duration} s", flush=True)
        cmd = [str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE), ENDPOINTS[args.endpoint],
               "--headless", "-u", str(args.users), "-r", str(args.users), "-t", f"{args.duration}s",
               "--stop-timeout", "10", "--host", server.url, "--csv", str(prefix), "--json-file", str(prefix),
               "--only-summary", "--loglevel", "WARNING"]
        env = {**os.environ, "LOADTEST_PAYLOADS": str((out / "payloads.json").resolve())}
        with open(out / "locust.log", "wb") as log:
            locust = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            t0, next_print = time.monotonic(), 60.0
            while locust.poll() is None:
                rss = rss_by_role(server)
                samples.append({"t": round(time.monotonic() - t0, 1), "rss": {k: round(v, 1) for k, v in rss.items()},
                                "total": round(sum(rss.values()), 1)})
                if samples[-1]["t"] >= next_print:
                    print(f"  {samples[-1]['t'] / 60:4.1f} min: RSS {samples[-1]['total']:.0f} MiB "
                          + " ".join(f"{k}={v:.0f}" for k, v in sorted(rss.items())), flush=True)
                    next_print += 60
                if time.monotonic() - t0 > args.duration + 120:
                    locust.kill()
                    raise RuntimeError("Locust did not stop on time")
                time.sleep(args.sample_every)
        after_load = after_load_status(server)
    finally:
        server.stop()
    # Samples taken after the load stopped (Locust's shutdown) would flatter the end window.
    samples = [s for s in samples if s["t"] <= args.duration]
    step = report.read_step(prefix, args.endpoint)
    result = {
        "command": "python -m loadtests.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "machine": machine(),
        "artifacts": str(args.artifacts), "endpoint": args.endpoint, "users": args.users,
        "duration_s": args.duration, "warmup_s": args.warmup, "window_s": args.window,
        "payloads": {"source": pl["source"], "texts": len(pl["texts"])}, "locust_rc": locust.returncode,
        "requests": step, "other_failures": step["failures"] - step["shed"],
        "rss": growth(samples, args.warmup, args.window), "samples": samples, "after_load_status": after_load,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(samples, result, out / "soak.png")
    g, r = result["rss"], step
    print(f"requests {r['requests']} ({r['rps']} req/s, p50 {r['p50']} ms, p99 {r['p99']} ms), failures "
          f"{r['failures']} of which shed (503) {r['shed']}, other {result['other_failures']}", flush=True)
    print(f"RSS {g['start_mib']} MiB -> {g['end_mib']} MiB: growth {g['growth_pct']}% (max {g.get('max_mib')} MiB; "
          f"{g.get('growth_from_first_sample_pct')}% since the first sample, before any request); "
          f"report: {out / 'soak.json'}, {out / 'soak.png'}", flush=True)
    print(f"an ordinary request after the load: HTTP {after_load}", flush=True)
    failed = after_load != 200 or result["other_failures"] > 0 or g["growth_pct"] is None or g["growth_pct"] >= args.max_growth
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
