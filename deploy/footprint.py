"""Memory and start-up time of one served Glowing (what a pod's memory request and probes must allow).

    python -m deploy.footprint --artifacts artifacts                     # about 30 s on 2 cores
    python -m deploy.footprint --model-tag glowing-models:latest         # the model-store path
    python -m deploy.footprint --artifacts artifacts --env GLOWING_SCORER_WORKERS=2

Starts `bentoml serve` on a free loopback port (loadtests/server.py), waits for /readyz, sends a few
/score and /generate requests so the runtimes allocate their buffers, then prints the seconds until
ready and the resident memory (RSS) of every process of the server, and stops it.
Measured on 2 vCPU AMD EPYC, cpu-preset models, ONNX fp32, 1 worker each: ready after 9.0 s, 552 MiB
in 4 processes (docs/OPERATIONS.md, Sizing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx

from loadtests.server import Server, descendants


def rss_mib(pid: int) -> tuple[float, str] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
    return kib / 1024, cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.footprint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts", help="GLOWING_ARTIFACTS to serve (default: artifacts)")
    ap.add_argument("--model-tag", help="GLOWING_MODEL_TAG to serve instead (a model-store tag)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="more GLOWING_* settings for the server (repeatable)")
    ap.add_argument("--requests", type=int, default=20, help="warm-up requests per endpoint (default: 20)")
    args = ap.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    if args.model_tag:
        env["GLOWING_MODEL_TAG"] = args.model_tag
    log = Path(tempfile.mkdtemp(prefix="glowing-footprint-")) / "serve.log"
    srv = Server(Path(args.artifacts), log, env)
    try:
        ready = srv.wait_ready()
        for _ in range(args.requests):
            httpx.post(f"{srv.url}/score", json={"texts": ["A long and moving film. " * 60]}, timeout=60)
            httpx.post(f"{srv.url}/generate", json={"prompt": "This movie", "max_new_tokens": 32, "n": 2}, timeout=60)
        procs = [p for p in (rss_mib(pid) for pid in [srv.proc.pid, *descendants(srv.proc.pid)]) if p]
        service = httpx.get(f"{srv.url}/info", timeout=10).json()["service"]
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        srv.stop()
    print(f"served: {service.get('model_tag') or service['artifacts']} (backend {service['backend']}, "
          f"device {service['device']})")
    print(f"ready after {ready:.1f} s")
    for mib, cmd in procs:
        print(f"  {mib:7.0f} MiB  {cmd[:110]}")
    print(f"total RSS {sum(m for m, _ in procs):.0f} MiB in {len(procs)} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
