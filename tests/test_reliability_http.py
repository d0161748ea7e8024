"""Reliability and security over real HTTP (``bentoml serve`` of the tiny models on 127.0.0.1):
the bad-input matrix, API-key authentication, overload shedding and recovery, a fault inside one
batch, and start-up with corrupt artifacts. About a minute on 2 CPU cores."""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from patched_service import FAULT
from support import envelope_problems

KEY = "reliability-test-key-52c1"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROBES = ["/livez", "/readyz", "/healthz"]
SERVER_ENV = {"GLOWING_API_KEY": KEY, "GLOWING_MAX_CONCURRENCY": "64"}  # conftest.py's `server`


# ---- the bad-input matrix: (name, path, body, status, param, words in the message) -------------
# docs/SERVING.md "Errors" documents each row.
MB = 1_000_000
MATRIX = [
    ("no texts", "/score", {"texts": []}, 400, "texts", "at least 1 item"),
    ("empty text", "/score", {"texts": ["fine", ""]}, 400, "texts[1]", "at least 1 character"),
    ("whitespace-only text", "/score", {"texts": [" \n\t\u3000"]}, 400, "texts[0]", "only whitespace"),
    ("100,000-character text", "/score", {"texts": ["x" * 100_000]}, 400, "texts[0]", "at most 10000 characters"),
    ("1 MB body, one text", "/score", {"texts": ["word " * (MB // 5)]}, 400, "texts[0]", "at most 10000"),
    ("body over the limit", "/score", b'{"texts": ["' + b"a" * (5 * MB) + b'"]}', 413, None, "larger than"),
    ("invalid JSON", "/score", b'{"texts": ["unclosed', 400, None, "Invalid JSON"),
    ("invalid UTF-8", "/score", b'{"texts": ["\xff\xfe caf\xe9"]}', 400, None, "Invalid JSON"),
    ("not an object", "/generate", b"[1, 2]", 400, None, "should be an object"),
    ("texts not a list", "/score", {"texts": "a review"}, 400, "texts", "valid array"),
    ("text not a string", "/score", {"texts": [42]}, 400, "texts[0]", "valid string"),
    ("n as a string", "/generate", {"n": "3"}, 400, "n", "valid integer"),
    ("n as a boolean", "/generate", {"n": True}, 400, "n", "valid integer"),
    ("n fractional", "/generate", {"n": 2.5}, 400, "n", "valid integer"),
    ("temperature NaN", "/generate", b'{"temperature": NaN}', 400, "temperature", "finite number"),
    ("min_positive Infinity", "/reviews", b'{"min_positive": Infinity}', 400, "min_positive", "finite number"),
    ("top_p -Infinity", "/generate", b'{"top_p": -Infinity}', 400, "top_p", "finite number"),
    ("overflowing float", "/reviews", b'{"min_positive": 1e999}', 400, "min_positive", "finite number"),
    ("negative n", "/generate", {"n": -1}, 400, "n", "greater than or equal to 1"),
    ("huge n", "/reviews", {"n": 10**30}, 400, "n", "less than or equal to 16"),
    ("negative max_new_tokens", "/generate", {"max_new_tokens": -5}, 400, "max_new_tokens", "greater than"),
    ("zero max_new_tokens", "/generate", {"max_new_tokens": 0}, 400, "max_new_tokens", "greater than"),
    ("huge max_new_tokens", "/reviews", {"max_new_tokens": 10**9}, 400, "max_new_tokens", "less than or equal"),
    ("min_positive below 0", "/reviews", {"min_positive": -0.1}, 400, "min_positive", "greater than or equal to 0"),
    ("min_positive above 1", "/reviews", {"min_positive": 1.5}, 400, "min_positive", "less than or equal to 1"),
    ("unknown field", "/score", {"texts": ["a"], "text": "b"}, 400, "text", "unknown field"),
    ("misspelt field", "/generate", {"max_tokens": 5}, 400, "max_tokens", "unknown field"),
    ("budget below n", "/reviews", {"n": 4, "max_candidates": 2}, 400, "max_candidates", "must be >= n"),
]


@pytest.mark.parametrize("name, path, body, status, param, words", MATRIX, ids=[row[0] for row in MATRIX])
def test_bad_input_gets_its_documented_error_and_the_server_keeps_serving(server, name, path, body, status,
                                                                          param, words):
    resp = server.post(path, body)
    assert resp.status_code == status, resp.text[:300]
    assert envelope_problems(resp) == []
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert server.serves()


@pytest.mark.parametrize("path, body", [
    ("/generate", {"prompt": "<|endoftext|>" * 5, "max_new_tokens": 6, "n": 2, "seed": 4}),
    ("/reviews", {"prompt": "<|endoftext|>", "max_new_tokens": 6, "n": 1, "min_positive": 0.0, "seed": 4}),
    ("/score", {"texts": ["<|endoftext|>", "<|endoftext|><|endoftext|>"]}),
])
def test_special_tokens_are_text(server, path, body):
    """A prompt or text made only of special tokens is served like any other (200)."""
    resp = server.post(path, body)
    assert resp.status_code == 200, resp.text
    if "prompt" in body:
        assert all(r["text"].startswith(body["prompt"]) for r in resp.json()["reviews"])
    else:
        assert len(resp.json()["results"]) == 2


def test_bad_requests_are_answered_not_logged_as_crashes(server):
    for _, path, body, *_ in MATRIX:
        server.post(path, body)
    assert "Traceback" not in server.output()


# ---- authentication -------------------------------------------------------------------------

PROTECTED = [("POST", "/score", {"texts": ["a"]}), ("POST", "/generate", {}), ("POST", "/reviews", {}),
             ("POST", "/info", {}), ("GET", "/info", None), ("GET", "/metrics", None), ("GET", "/docs.json", None),
             ("GET", "/", None), ("GET", "/nowhere", None)]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                                     {"X-API-Key": KEY}], ids=["none", "wrong", "no-scheme", "basic", "longer",
                                                               "other-header"])
def test_every_endpoint_but_the_probes_requires_the_key(server, headers):
    for method, path, body in PROTECTED:
        resp = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
        assert resp.status_code == 401, (method, path, resp.status_code)
        assert envelope_problems(resp) == [] and resp.json()["error"]["type"] == "authentication_error"
        assert resp.headers["www-authenticate"].startswith("Bearer")
    for path in PROBES:
        assert httpx.get(f"{server.url}{path}", headers=headers, timeout=10).status_code == 200


def test_the_key_opens_every_endpoint(server):
    for method, path, body in PROTECTED:
        resp = httpx.request(method, f"{server.url}{path}", json=body, timeout=60,
                             headers={"Authorization": f"bearer  {KEY}"})  # scheme case and spacing do not matter
        assert resp.status_code == (404 if path == "/nowhere" else 200), (method, path, resp.text[:200])
    spec = httpx.get(f"{server.url}/docs.json", headers=AUTH, timeout=10).json()
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert spec["paths"]["/score"]["post"]["security"] == [{"bearer": []}]
    assert spec["paths"]["/livez"]["get"]["security"] == [] and "401" in spec["paths"]["/score"]["post"]["responses"]


def test_the_python_client_sends_the_key(server):
    import bentoml

    with bentoml.SyncHTTPClient(server.url, token=KEY) as client:  # docs/SERVING.md "Python client"
        assert len(client.score(texts=["A wonderful, moving film."])["results"]) == 1


def test_probe_errors_are_enveloped_too(server):
    resp = httpx.post(f"{server.url}/livez", timeout=10)
    assert resp.status_code == 405 and envelope_problems(resp) == []


# ---- overload -------------------------------------------------------------------------------

def test_overload_at_4x_is_shed_fast_and_the_server_recovers(exported, serve):
    """max_concurrency 2, 8 simultaneous slow /reviews (about 0.5 s each alone), three waves: the
    excess is answered 503 with Retry-After at once, the rest succeed within the timeout, and
    afterwards ordinary requests succeed."""
    limit, timeout = 2, 20.0
    srv = serve(exported, GLOWING_MAX_CONCURRENCY=str(limit), GLOWING_TIMEOUT=str(timeout))
    slow = {"prompt": "This movie", "n": 16, "max_candidates": 128, "min_positive": 1.0, "max_new_tokens": 64}
    for wave in range(3):
        gate = threading.Barrier(4 * limit)

        def call(_):
            gate.wait()
            t0 = time.monotonic()
            resp = srv.post("/reviews", slow)
            return resp, time.monotonic() - t0

        with cf.ThreadPoolExecutor(4 * limit) as pool:
            answers = list(pool.map(call, range(4 * limit)))
        shed = [(r, s) for r, s in answers if r.status_code == 503]
        served = [(r, s) for r, s in answers if r.status_code == 200]
        assert len(shed) + len(served) == 4 * limit, [r.status_code for r, _ in answers]
        assert len(served) >= limit and len(shed) >= limit, [r.status_code for r, _ in answers]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded" for r, _ in shed)
        assert max(s for _, s in shed) < 1.0, f"wave {wave}: shedding took {max(s for _, s in shed):.2f} s"
        assert max(s for _, s in served) < timeout
        assert max(s for _, s in shed) < min(s for _, s in served)  # shed at the door, not after a queue
    for _ in range(5):  # the load has dropped: everything is served again
        assert srv.post("/reviews", {**slow, "max_candidates": 16}).status_code == 200
    assert httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 200


# ---- faults -------------------------------------------------------------------------------------

def test_a_fault_in_one_batch_fails_only_its_requests(exported, serve):
    srv = serve(exported, target="tests.patched_service:Glowing", GLOWING_TEST_FAULT="1", GLOWING_API_KEY=KEY)
    alone = srv.post("/score", {"texts": [f"a review {FAULT}"]})
    assert alone.status_code == 500 and envelope_problems(alone) == []
    assert alone.json()["error"] == {"message": "internal error; the server log has the details",
                                     "type": "internal_error", "param": None, "code": None}
    assert httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 200 and srv.serves()

    texts = [f"Review {i}: {'superb' if i % 2 else 'dreadful'} acting." for i in range(24)]
    texts[7] += FAULT
    with cf.ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(lambda t: srv.post("/score", {"texts": [t]}), texts))
    codes = [a.status_code for a in answers]
    assert codes[7] == 500 and set(codes) == {200, 500}, codes
    assert all(envelope_problems(a) == [] for a in answers if a.status_code == 500)
    # Every failed request shared the faulty batch: as many 500s as texts in the batches that failed.
    failed_batches = [int(line.split("a batch of ")[1].split()[0]) for line in srv.output().splitlines()
                      if "injected fault: a batch of" in line]
    assert codes.count(500) == sum(failed_batches) - 1  # minus the request sent alone
    assert codes.count(200) >= len(texts) // 2, codes
    assert httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 200 and srv.serves()


def _broken_copy(exported: Path, tmp_path: Path) -> Path:
    root = tmp_path / "artifacts"
    shutil.copytree(exported, root)
    return root


@pytest.mark.parametrize("damage, expected", [
    ("onnx/classifier/model.onnx", "differs from the file the export recorded"),
    ("manifest.json", "manifest.json"),
    ("onnx/generator/tokenizer.json", "generator"),
])
def test_corrupt_artifacts_stop_the_server_naming_the_file(exported, tmp_path, serve, damage, expected):
    root = _broken_copy(exported, tmp_path)
    target = root / damage
    target.write_bytes(target.read_bytes()[: max(len(target.read_bytes()) // 2, 1)])
    srv = serve(root, ready=False)
    code = srv.proc.wait(90)
    srv.stop()
    out = srv.output()
    assert code != 0 and "glowing: cannot start" in out and expected in out, out[-2000:]
    assert str(target.relative_to(root)) in out or target.name in out
    assert "make" in out  # the command that rebuilds it
