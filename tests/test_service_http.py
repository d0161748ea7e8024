"""The served stack over HTTP: a real ``bentoml serve`` subprocess on 127.0.0.1 with the exported
tiny models. Every endpoint, bad inputs, readiness, metrics, adaptive batching, load shedding and
a start-up failure. About a minute on 2 CPU cores (the tiny export included)."""

from __future__ import annotations

import concurrent.futures as cf
import re

import httpx
import pytest

from support import SAMPLING

SERVER_ENV = {"GLOWING_MAX_CONCURRENCY": "64"}  # conftest.py's `server`
TEXTS = ["Great film.", "Awful, boring, a waste of time.", "It was fine.<br /><br />Not more.",
         " ".join(["The plot was moving and the cast was wonderful."] * 30)]


def test_ready_only_once_both_models_are_loaded_and_warm(server):
    log = server.output()
    assert "classifier loaded and warmed up" in log and "generator loaded and warmed up" in log
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert server.post("/score", {"texts": ["ready means ready"]}).status_code == 200


def test_score(server):
    resp = server.post("/score", {"texts": TEXTS})
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert [set(r) for r in results] == [{"label", "p_positive"}] * len(TEXTS)
    alone = [server.post("/score", {"texts": [t]}).json()["results"][0] for t in TEXTS]
    assert alone == results  # identical, not close


def test_generate_is_scored_and_reproducible_with_a_seed(server):
    body = {**SAMPLING, "n": 3, "seed": 21}
    first, again = server.post("/generate", body), server.post("/generate", body)
    assert first.status_code == 200 and first.json() == again.json()
    reviews = first.json()["reviews"]
    assert len(reviews) == 3 and first.json()["seed"] == 21
    assert all(r["text"].startswith("This movie") and 0 <= r["p_positive"] <= 1 for r in reviews)
    unseeded = server.post("/generate", {**SAMPLING, "n": 2}).json()
    assert server.post("/generate", {**SAMPLING, "n": 2, "seed": unseeded["seed"]}).json() == unseeded


def test_seeded_reviews_are_the_same_alone_and_among_16_clients(server):
    body = {**SAMPLING, "n": 2, "min_positive": 0.5, "max_candidates": 16, "seed": 5}
    alone = server.post("/reviews", body)
    assert alone.status_code == 200
    with cf.ThreadPoolExecutor(16) as pool:
        crowd = list(pool.map(lambda seed: server.post("/reviews", {**body, "seed": seed}), [5] * 4 + list(range(12))))
    assert all(c.status_code == 200 for c in crowd)
    assert all(c.json()["reviews"] == alone.json()["reviews"] for c in crowd[:4])


def test_reviews_complete_and_out_of_budget(server):
    done = server.post("/reviews", {**SAMPLING, "n": 2, "min_positive": 0.0, "max_candidates": 8, "seed": 3})
    assert done.status_code == 200
    body = done.json()
    assert body["complete"] and len(body["reviews"]) == 2
    assert set(body["stats"]) == {"candidates", "accepted", "rounds", "acceptance_rate", "elapsed_ms", "tokens",
                                  "cancelled", "wasted_tokens"}
    short = server.post("/reviews", {**SAMPLING, "n": 2, "min_positive": 1.0, "max_candidates": 5, "seed": 3})
    assert short.status_code == 200
    assert short.json()["complete"] is False and short.json()["stats"]["candidates"] == 5


def test_info_by_get_and_post(server):
    got = httpx.get(f"{server.url}/info", timeout=10)
    posted = httpx.post(f"{server.url}/info", json={}, timeout=10)
    assert got.status_code == posted.status_code == 200 and got.json() == posted.json()
    info = got.json()
    assert info["models"]["classifier"]["providers"] == ["CPUExecutionProvider"]
    assert info["batching"]["mode"] == "engine" and info["batching"]["generator"]["max_rows"] == 64
    assert info["batching"]["generator"]["max_waiting"] >= 1 and info["batching"]["classifier"]["wait_ms"] == 0
    assert info["limits"]["max_concurrency"] == 64
    assert "classifier.imdb_test.accuracy" in info["metrics"]


BAD = [
    ("/score", {"texts": []}, "texts"),
    ("/score", {"texts": ["ok", ""]}, "texts[1]"),
    ("/score", {"texts": ["x" * 10_001]}, "texts[0]"),
    ("/generate", {"max_tokens": 5}, "max_tokens"),  # misspelt: an error, not silently ignored
    ("/generate", {"n": 1000}, "n"),
    ("/generate", {"max_new_tokens": 0}, "max_new_tokens"),
    ("/generate", {"temperature": -1}, "temperature"),
    ("/generate", {"top_p": 0}, "top_p"),
    ("/generate", {"top_k": -5}, "top_k"),
    ("/generate", {"seed": "abc"}, "seed"),
    ("/reviews", {"min_positive": 2}, "min_positive"),
    ("/reviews", {"max_candidates": 100_000}, "max_candidates"),
    ("/reviews", {"n": 5, "max_candidates": 2}, "max_candidates"),
]


@pytest.mark.parametrize("path, body, param", BAD)
def test_bad_input_is_a_400_naming_the_field(server, path, body, param):
    resp = server.post(path, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]
    assert "Traceback" not in resp.text


def test_malformed_requests_get_the_envelope_and_the_server_keeps_serving(server):
    not_json = httpx.post(f"{server.url}/score", content=b'{"texts": [', timeout=10)
    wrong_method = httpx.get(f"{server.url}/score", timeout=10)
    unknown = httpx.get(f"{server.url}/nowhere", timeout=10)
    for resp, status in ((not_json, 400), (wrong_method, 405), (unknown, 404)):
        assert resp.status_code == status and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert server.post("/score", {"texts": ["still here"]}).status_code == 200
    assert "Traceback" not in server.output()  # bad requests are answered, not logged as crashes


def _histogram(metrics: str, name: str, labels: str) -> dict[str, float]:
    """``{le: cumulative count}`` of one Prometheus histogram series."""
    pattern = re.compile(rf'^{name}_bucket\{{(?=[^}}]*{labels})[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$', re.M)
    return {le: float(v) for le, v in pattern.findall(metrics)}


def test_concurrent_requests_arrive_batched(server):
    texts = [f"Review number {i}: the acting was {'superb' if i % 2 else 'dreadful'}." for i in range(32)]
    alone = {t: server.post("/score", {"texts": [t]}).json()["results"][0]["p_positive"] for t in texts[:4]}
    before = _histogram(server.metrics(), "glowing_batch_size", 'model="classifier"')
    # Four waves of 32: BentoML's dispatcher sends its first calls alone while it calibrates, and
    # its client renews its connection pool every 100 calls, under the calls in flight (retried).
    with cf.ThreadPoolExecutor(32) as pool:
        for _ in range(4):
            answers = list(pool.map(lambda t: server.post("/score", {"texts": [t]}), texts))
            assert [a.status_code for a in answers] == [200] * len(texts), [a.text for a in answers if a.is_error]
    after = _histogram(server.metrics(), "glowing_batch_size", 'model="classifier"')
    batches, singles = after["+Inf"] - before.get("+Inf", 0), after["1.0"] - before.get("1.0", 0)
    assert batches < 4 * len(texts) and singles < batches, f"no classifier batch larger than 1: {after}"
    together = {t: a.json()["results"][0]["p_positive"] for t, a in zip(texts, answers)}
    assert all(together[t] == p for t, p in alone.items())  # a score does not depend on its batch


def test_metrics_show_batch_sizes_candidates_and_acceptance(server):
    server.post("/reviews", {**SAMPLING, "n": 1, "min_positive": 0.0, "max_candidates": 4, "seed": 1})
    server.post("/generate", {"n": 100})  # an error, counted
    assert server.post("/generate", {**SAMPLING, "n": 4, "seed": 2}).status_code == 200  # 4 first tokens, whatever ran before
    metrics = server.metrics()
    for name in ("glowing_batch_size_bucket", "glowing_reviews_candidates_bucket",
                 "glowing_reviews_acceptance_rate_bucket", "glowing_reviews_generated_total",
                 "glowing_reviews_accepted_total", "glowing_time_to_first_token_seconds_bucket",
                 "glowing_inter_token_latency_seconds_bucket", "glowing_request_queue_time_seconds_bucket",
                 "glowing_e2e_request_latency_seconds_bucket", "glowing_num_requests_running",
                 "glowing_num_requests_waiting", "glowing_prompt_tokens_total", "glowing_generation_tokens_total",
                 "glowing_scorer_padding_share_bucket"):
        assert name in metrics, name
    for service in ("glowing", "glowing-scorer", "glowing-generator"):  # each froze its heap after a full collection
        assert _histogram(metrics, "glowing_gc_full_collection_seconds", f'service="{service}"')["+Inf"] >= 1, service
    assert re.search(r'glowing_errors_total\{endpoint="/generate",type="invalid_request_error"\} [1-9]', metrics)
    assert _histogram(metrics, "glowing_time_to_first_token_seconds", "")["+Inf"] >= 4


def test_openapi_documents_the_endpoints_bounds_and_errors(server):
    spec = httpx.get(f"{server.url}/docs.json", timeout=10).json()
    paths = spec["paths"]
    assert {"/score", "/generate", "/reviews", "/info"} <= set(paths) and "get" in paths["/info"]

    def request(path):
        return paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]

    assert request("/score")["texts"]["maxItems"] == 64 and request("/score")["texts"]["items"]["maxLength"] == 10_000
    assert request("/reviews")["min_positive"]["default"] == 0.9 and request("/generate")["top_p"]["maximum"] == 1
    responses = paths["/reviews"]["post"]["responses"]
    assert {"200", "400", "503", "504"} <= set(responses)
    error = spec["components"]["schemas"]["InvalidArgument"]
    assert set(error["properties"]["error"]["properties"]) == {"message", "type", "param", "code"}


def test_overload_is_shed_with_503(exported, serve):
    srv = serve(exported, GLOWING_MAX_CONCURRENCY="2")
    body = {**SAMPLING, "n": 16, "max_new_tokens": 96}  # long enough to overlap
    with cf.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: srv.post("/generate", body), range(12)))
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
    shed = next(a for a in answers if a.status_code == 503)
    assert shed.json()["error"]["type"] == "overloaded" and shed.headers["retry-after"] == "1"
    assert srv.post("/score", {"texts": ["after the storm"]}).status_code == 200


def test_batch_size_one_serves_without_adaptive_batching(exported, serve):
    srv = serve(exported, GLOWING_BATCHING="adaptive", GLOWING_SCORER_MAX_BATCH_SIZE="1",
                GLOWING_GENERATOR_MAX_BATCH_SIZE="1")

    def calls_and_texts() -> tuple[float, float]:
        text = srv.metrics()
        def get(part: str) -> float:  # the series appears with the first request
            found = re.findall(rf'glowing_batch_size_{part}\{{model="classifier"\}} ([0-9.e+]+)', text)
            return float(found[0]) if found else 0.0

        return get("count"), get("sum")

    calls0, texts0 = calls_and_texts()
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda t: srv.post("/score", {"texts": [t]}), TEXTS * 4))
    assert all(r.status_code == 200 for r in answers)
    calls1, texts1 = calls_and_texts()
    assert calls1 - calls0 == texts1 - texts0 == len(TEXTS) * 4  # one model call per request
    gen = srv.post("/generate", {**SAMPLING, "n": 2, "seed": 3})
    assert gen.status_code == 200 and len(gen.json()["reviews"]) == 2


def test_missing_artifacts_stop_the_server_with_the_file_and_the_command(serve, tmp_path):
    srv = serve(tmp_path / "no-artifacts", ready=False)
    code = srv.proc.wait(60)
    srv.stop()
    out = srv.output()
    assert code != 0
    assert f"{tmp_path / 'no-artifacts' / 'manifest.json'} is missing" in out and "make serve" in out
