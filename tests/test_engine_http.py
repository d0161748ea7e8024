"""The serving engine over HTTP: a real ``bentoml serve`` of the tiny export with a small engine (2 rows,
a short queue) and a generator slowed to 10 ms a step (tests/patched_service.py) so that work lasts long
enough to stream, cancel and overflow."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from glowing.runtime import load_generator
from service.batching import expand
from service.schemas import GenerationItem
from support import SAMPLING

# conftest.py's `server`: a small engine (2 rows, a short queue) and a generator 10 ms slower a step
SERVER_TARGET = "tests.patched_service:Glowing"
SERVER_ENV = {"GLOWING_ENGINE_MAX_ROWS": "2", "GLOWING_ENGINE_MAX_WAITING": "12", "GLOWING_REVIEWS_ROUND_SIZE": "8",
              "GLOWING_TEST_STEP_MS": "10",
              "GLOWING_MAX_CANDIDATES": "128"}


def events(response: httpx.Response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def gauge(metrics: str, name: str) -> float:
    found = re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", metrics, re.M)
    return sum(float(v) for v in found)


def test_streamed_generate_sends_deltas_then_scored_reviews_then_done(server):
    body = {**SAMPLING, "n": 3, "seed": 21, "max_new_tokens": 20}
    with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        got = events(resp)
    assert got[-1] == "[DONE]"
    finals = {e["index"]: e for e in got[:-1] if "text" in e}
    assert set(finals) == {0, 1, 2}
    for i, final in finals.items():
        deltas = "".join(e["delta"] for e in got[:-1] if e.get("index") == i and "delta" in e)
        assert final["text"] == SAMPLING["prompt"] + deltas
        assert 0 <= final["p_positive"] <= 1 and final["label"] in ("positive", "negative")
        assert final["seed"] == 21 and final["finish_reason"] in ("stop", "length")
        # a row's final event comes after all of its deltas
        assert max(k for k, e in enumerate(got[:-1]) if e.get("index") == i and "delta" in e) < got.index(final)
    plain = server.post("/generate", body).json()
    assert [r["text"] for r in plain["reviews"]] == [finals[i]["text"] for i in range(3)]
    assert [r["p_positive"] for r in plain["reviews"]] == [finals[i]["p_positive"] for i in range(3)]


def test_a_seeded_request_gives_the_reviews_of_the_request_level_path(server, exported):
    """Same seed derivation as before the engine: row i of a request is the runtime's own loop with
    derive_seed(seed, i), whatever else the engine runs at the same time."""
    body = {**SAMPLING, "n": 4, "seed": 77, "max_new_tokens": 24}
    generator = load_generator(exported / "onnx" / "generator", "onnx", "cpu")
    item = GenerationItem(prompt=body["prompt"], n=4, max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50,
                          seed=77)
    expected = [body["prompt"] + generator.generate([r.prompt], r.settings)[0] for r in expand([item])]
    noise = threading.Thread(target=lambda: server.post("/reviews", {**SAMPLING, "n": 8, "min_positive": 1.0,
                                                                      "max_candidates": 24}))
    noise.start()
    got = [r["text"] for r in server.post("/generate", body).json()["reviews"]]
    noise.join()
    assert got == expected


def test_a_full_queue_answers_503_with_retry_after(server):
    resp = server.post("/generate", {**SAMPLING, "n": 13})  # 13 rows > the 12 the queue may hold
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "overloaded"
    streamed = httpx.post(f"{server.url}/generate", json={**SAMPLING, "n": 13, "stream": True}, timeout=30)
    assert streamed.status_code == 503  # the first event is awaited before the status is sent
    assert server.post("/generate", {**SAMPLING, "n": 2}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_abandoned_requests_stop_their_rows(server, stream):
    """A /reviews that can never finish (min_positive 1.0, 128 candidates, 2 rows at a time) and a long
    streamed /generate whose clients leave after half a second: their rows are cancelled and the
    engine goes idle."""
    before = server.metrics()
    path, body = ("/generate", {**SAMPLING, "n": 12, "max_new_tokens": 60, "stream": True}) if stream else \
        ("/reviews", {**SAMPLING, "n": 4, "min_positive": 1.0, "max_candidates": 128, "max_new_tokens": 60})
    started = time.monotonic()
    try:
        with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=httpx.Timeout(10, read=0.5)) as resp:
            for _ in resp.iter_raw():
                if time.monotonic() - started > 0.5:
                    break  # leaving the block closes the connection
    except httpx.ReadTimeout:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = server.metrics()
        if gauge(after, "glowing_num_requests_running") == 0 and gauge(after, "glowing_num_requests_waiting") == 0:
            break
        time.sleep(0.1)
    assert gauge(after, "glowing_num_requests_running") == 0 and gauge(after, "glowing_num_requests_waiting") == 0
    cancelled = gauge(after, "glowing_rows_cancelled_total") - gauge(before, "glowing_rows_cancelled_total")
    assert cancelled >= 1, "no row was cancelled: the abandoned request ran to its end"
    tokens = gauge(server.metrics(), "glowing_generation_tokens_total")
    time.sleep(0.5)
    assert gauge(server.metrics(), "glowing_generation_tokens_total") == tokens  # nothing runs any more
    assert server.post("/generate", {**SAMPLING, "n": 2}).status_code == 200


def test_streamed_reviews_are_the_answer_of_the_plain_request(server):
    """The answer is the first passing candidates in candidate order: the same for a seeded request
    streamed or not (the same among 16 concurrent clients: test_service_http.py)."""
    body = {**SAMPLING, "n": 2, "min_positive": 0.5, "max_candidates": 16, "seed": 5}
    alone = server.post("/reviews", body).json()
    with httpx.stream("POST", f"{server.url}/reviews", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        streamed = events(resp)
    assert streamed[-1] == "[DONE]" and streamed[-2]["complete"] == alone["complete"]
    accepted = streamed[:-2]
    assert [e["index"] for e in accepted] == list(range(len(accepted)))
    assert [(e["text"], e["p_positive"]) for e in accepted] == [(r["text"], r["p_positive"]) for r in alone["reviews"]]
    assert [e["candidate"] for e in accepted] == sorted(e["candidate"] for e in accepted)
    stats = alone["stats"]
    assert {"candidates", "accepted", "rounds", "acceptance_rate", "elapsed_ms", "cancelled", "wasted_tokens"} <= set(stats)
    assert stats["wasted_tokens"] >= 0 and stats["candidates"] <= 16
