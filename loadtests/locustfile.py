"""Locust users for the Glowing API: ``/score``, ``/generate`` and ``/reviews``.

    .venv/bin/python -m loadtests.payloads --out /tmp/glowing_payloads.json
    LOADTEST_PAYLOADS=/tmp/glowing_payloads.json .venv/bin/locust -f loadtests/locustfile.py ScoreUser \
        --headless -u 16 -r 16 -t 15s --host http://127.0.0.1:3000 --csv /tmp/score

Name one or more user classes (``ScoreUser``, ``GenerateUser``, ``ReviewsUser``) after the file, or set
``LOADTEST_USERS`` to a comma list of them; with neither, all three run (weights 8:1:1).
``python -m loadtests.run`` does all of this for a ladder of user counts and several server settings.

Environment (all optional):

- ``LOADTEST_PAYLOADS``: JSON written by ``loadtests.payloads`` (IMDB test reviews of varied length and
  review-opening prompts); unset = a few built-in examples.
- ``LOADTEST_WAIT``: seconds each user waits between requests, ``0`` (default, closed loop at full speed)
  or a range ``0.5-2`` (uniform).
- ``LOADTEST_TEXTS``: texts per ``/score`` request (default 1: batching has to come from the server).
- ``LOADTEST_MAX_NEW_TOKENS`` (default 32), ``LOADTEST_N`` (default 1): ``/generate`` and ``/reviews`` sizes.
- ``GLOWING_API_KEY``: sent as ``Authorization: Bearer <key>`` (the server's own setting, so that one
  exported variable serves both); unset = no header.
- ``LOADTEST_WORKER_COUNTS``: on a ``--worker`` (distributed mode, ``loadtests.run --workers N``), a JSON
  file this worker keeps its running totals in, per request name: what it reported to the master.

Loopback targets only (the run refuses any other host) and a bounded run (``-t`` is required headless).
A non-200 answer is a failure; a 503 is reported as ``shed (503)`` in the failures, so that load shed
by the server is told apart from errors. This file imports only Locust (with its gevent) and the standard
library.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import random
import time
from urllib.parse import urlparse

import gevent
from locust import FastHttpUser, between, constant, events, task
from locust.rpc import Message
from locust.runners import STATE_STOPPED, MasterRunner, WorkerRunner

FALLBACK = {"texts": ["Great film.", "Awful, boring, a waste of time.",
                      "I went in expecting little and came out moved. The cast is wonderful."],
            "prompts": ["This movie", "I loved", "The acting in this film"]}


def _payloads() -> dict:
    path = os.environ.get("LOADTEST_PAYLOADS")
    if not path:
        return FALLBACK
    with open(path, encoding="utf-8") as f:
        return json.load(f)


PAYLOADS = _payloads()
TEXTS_PER_REQUEST = int(os.environ.get("LOADTEST_TEXTS", "1"))
MAX_NEW_TOKENS = int(os.environ.get("LOADTEST_MAX_NEW_TOKENS", "32"))
N = int(os.environ.get("LOADTEST_N", "1"))


def _wait_time():
    spec = os.environ.get("LOADTEST_WAIT", "0").strip()
    if "-" in spec:
        low, high = (float(x) for x in spec.split("-", 1))
        return between(low, high)
    return constant(float(spec))


def _is_loopback(host: str | None) -> bool:
    name = urlparse(host or "").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@events.init.add_listener
def _guard(environment, **_kw):
    """Refuse a non-loopback host and an unbounded headless run before any request is sent."""
    opts = environment.parsed_options
    if opts is None:
        return
    if not _is_loopback(opts.host):
        raise SystemExit(f"locustfile: --host {opts.host!r} is not a loopback address; load only 127.0.0.1")
    if getattr(opts, "headless", False) and not getattr(opts, "run_time", None):
        raise SystemExit("locustfile: a headless run needs a bounded duration: pass -t/--run-time")


@events.init.add_listener
def _distributed(environment, **_kw):
    """Distributed mode (``loadtests.run --workers N``): no request may go missing between workers and master.

    Locust's master, on quitting, gives its workers 0.5 s for their final reports and then stops
    listening. A worker first lets its users finish the request they are waiting on (``--stop-timeout``),
    so near saturation its last report comes later and is dropped: 54 of 365 ``/reviews`` requests at 64
    users here. Each worker marks the report it sends once stopped, and the master waits for every
    worker's marked report (at most ``--stop-timeout`` + 5 s) before it stops listening. A worker with
    ``LOADTEST_WORKER_COUNTS`` set also adds up what it reported, per request name, in that JSON file
    (rewritten after each report), so that the run can check the master's aggregate against it."""
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        path = os.environ.get("LOADTEST_WORKER_COUNTS")
        totals: dict[str, dict[str, int]] = {}

        def on_report(client_id, data, **_kw):  # runs after Locust's own listener has filled ``data``
            data["loadtest_final"] = runner.state == STATE_STOPPED
            if not path:
                return
            for entry in data.get("stats", []):
                row = totals.setdefault(entry["name"], {"requests": 0, "failures": 0})
                row["requests"] += entry["num_requests"]
                row["failures"] += entry["num_failures"]
            with open(f"{path}.tmp", "w", encoding="utf-8") as f:
                json.dump(totals, f)
            os.replace(f"{path}.tmp", path)

        environment.events.report_to_master.add_listener(on_report)
    elif isinstance(runner, MasterRunner):
        final: set[str] = set()
        environment.events.worker_report.add_listener(
            lambda client_id, data, **_kw: final.add(client_id) if data.get("loadtest_final") else None)

        def quit_after_final_reports():  # MasterRunner.quit (Locust 2.47) with the 0.5 s sleep replaced
            workers = {c.id for c in runner.clients.all}
            runner.stop(send_stop_to_client=False)
            for worker in workers:
                runner.server.send_to_client(Message("quit", None, worker))
            deadline = time.monotonic() + (environment.stop_timeout or 0) + 5
            while not final >= workers and time.monotonic() < deadline:
                gevent.sleep(0.1)
            runner.greenlet.kill(block=True)

        runner.quit = quit_after_final_reports


def _check(resp) -> None:
    if resp.status_code == 200:
        resp.success()
    elif resp.status_code == 503:
        resp.failure("shed (503)")
    else:
        resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")


class _GlowingUser(FastHttpUser):
    """Locust's geventhttpclient user, not its ``requests`` one: the load generator shares the server's
    cores here, and ``HttpUser`` cost about three times the CPU per request (docs/LOADTESTS.md)."""
    abstract = True
    wait_time = _wait_time()
    network_timeout = connection_timeout = 600.0  # a /reviews under heavy load may take minutes
    default_headers = {"Authorization": f"Bearer {os.environ['GLOWING_API_KEY']}"} \
        if os.environ.get("GLOWING_API_KEY") else None

    def on_start(self):
        self.rng = random.Random(id(self))


class ScoreUser(_GlowingUser):
    """``POST /score`` with ``LOADTEST_TEXTS`` IMDB reviews (default 1) per request."""
    weight = 8

    @task
    def score(self):
        texts = self.rng.sample(PAYLOADS["texts"], min(TEXTS_PER_REQUEST, len(PAYLOADS["texts"])))
        with self.client.post("/score", json={"texts": texts}, catch_response=True, name="/score") as resp:
            _check(resp)


class GenerateUser(_GlowingUser):
    """``POST /generate`` from a review opening, seeded (replays are cheap to check)."""
    weight = 1
    _seeds = itertools.count()

    @task
    def generate(self):
        body = {"prompt": self.rng.choice(PAYLOADS["prompts"]), "n": N, "max_new_tokens": MAX_NEW_TOKENS,
                "temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": next(self._seeds)}
        with self.client.post("/generate", json=body, catch_response=True, name="/generate") as resp:
            _check(resp)


class ReviewsUser(_GlowingUser):
    """``POST /reviews``: the product, with a small candidate budget."""
    weight = 1

    @task
    def reviews(self):
        body = {"prompt": self.rng.choice(PAYLOADS["prompts"]), "n": N, "min_positive": 0.5,
                "max_candidates": max(4 * N, 8), "max_new_tokens": MAX_NEW_TOKENS}
        with self.client.post("/reviews", json=body, catch_response=True, name="/reviews") as resp:
            _check(resp)


_selected = [name.strip() for name in os.environ.get("LOADTEST_USERS", "").split(",") if name.strip()]
if _selected:  # only the named classes stay concrete; Locust skips abstract ones
    for _cls in (ScoreUser, GenerateUser, ReviewsUser):
        if _cls.__name__ not in _selected:
            _cls.abstract = True
