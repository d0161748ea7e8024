"""The service's plain logic, without models or a server: settings, request bounds, the error
envelope and the ASGI guard, generation batching and seeds, the /reviews rounds."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from pydantic import ValidationError

from service import batching, errors
from service.admission import Admission
from service.reviews import collect_reviews, round_size
from service.schemas import GenerationItem, request_models
from service.settings import Settings, env_table, get_settings


# ---- settings --------------------------------------------------------------------------------

def test_settings_read_the_environment_at_call_time(monkeypatch):
    monkeypatch.setenv("GLOWING_ARTIFACTS", "/somewhere")
    monkeypatch.setenv("GLOWING_SCORER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("GLOWING_BACKEND", "torch")
    s = get_settings()
    assert (str(s.artifacts), s.scorer_max_batch_size, s.backend) == ("/somewhere", 7, "torch")
    monkeypatch.setenv("GLOWING_SCORER_MAX_BATCH_SIZE", "9")
    assert get_settings().scorer_max_batch_size == 9


@pytest.mark.parametrize("env, name", [({"GLOWING_BACKEND": "tensorflow"}, "backend"),
                                       ({"GLOWING_MAX_N": "0"}, "max_n"),
                                       ({"GLOWING_MAX_N": "20", "GLOWING_MAX_CANDIDATES": "10"}, "MAX_CANDIDATES")])
def test_bad_settings_name_the_variable(monkeypatch, env, name):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=name):
        get_settings()


def test_every_setting_has_a_description_for_the_readme():
    rows = env_table()
    assert len(rows) == len(Settings.model_fields) and all(desc for _, _, desc in rows)
    assert ("GLOWING_ARTIFACTS", "artifacts") == rows[0][:2]


# ---- request bounds ----------------------------------------------------------------------------

LIMITS = Settings(max_texts=3, max_text_chars=20, max_n=4, max_new_tokens=32, max_candidates=10)
REQ = request_models(LIMITS)


@pytest.mark.parametrize("model, body, param", [
    ("score", {"texts": []}, "texts"),
    ("score", {"texts": ["a"] * 4}, "texts"),
    ("score", {"texts": ["ok", "x" * 21]}, "texts[1]"),
    ("score", {"texts": ["ok", ""]}, "texts[1]"),
    ("score", {"texts": "not a list"}, "texts"),
    ("score", {"texts": ["ok"], "extra": 1}, "extra"),
    ("generate", {"n": 5}, "n"),
    ("generate", {"n": 0}, "n"),
    ("generate", {"max_new_tokens": 33}, "max_new_tokens"),
    ("generate", {"temperature": -0.1}, "temperature"),
    ("generate", {"temperature": 2.5}, "temperature"),
    ("generate", {"top_p": 0}, "top_p"),
    ("generate", {"top_p": 1.5}, "top_p"),
    ("generate", {"top_k": -1}, "top_k"),
    ("generate", {"seed": -1}, "seed"),
    ("generate", {"prompt": "x" * 1001}, "prompt"),
    ("reviews", {"min_positive": 1.5}, "min_positive"),
    ("reviews", {"max_candidates": 11}, "max_candidates"),
    ("reviews", {"n": 4, "max_candidates": 3}, "max_candidates"),
])
def test_every_bound_is_rejected_with_the_field_named(model, body, param):
    with pytest.raises(ValidationError) as info:
        getattr(REQ, model).model_validate(body)
    err = errors.from_validation(info.value)
    assert (err.status, err.param, err.type) == (400, param, "invalid_request_error")
    assert err.message.startswith(f"{param}: ")


def test_defaults_and_openapi_show_the_configured_limits():
    reviews = REQ.reviews.model_validate({})
    assert (reviews.n, reviews.min_positive, reviews.max_candidates, reviews.seed) == (3, 0.9, 10, None)
    schema = REQ.score.model_json_schema()
    assert schema["properties"]["texts"]["maxItems"] == 3
    assert schema["properties"]["texts"]["items"]["maxLength"] == 20
    assert REQ.generate.model_json_schema()["properties"]["n"]["maximum"] == 4


# ---- errors ------------------------------------------------------------------------------------

class Coded(Exception):
    def __init__(self, code):
        self.error_code = type("Code", (), {"value": code})()


@pytest.mark.parametrize("exc, status, type_", [
    (asyncio.TimeoutError(), 504, "timeout"), (Coded(503), 503, "overloaded"), (Coded(429), 503, "overloaded"),
    (Coded(504), 504, "timeout"), (RuntimeError("/secret/path/model.onnx exploded"), 500, "internal_error")])
def test_internal_failures_map_to_an_envelope_without_details(exc, status, type_):
    err = errors.from_exception(exc)
    assert (err.status, err.type) == (status, type_)
    assert "/secret" not in err.message and "Traceback" not in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def _app(**admission):
    """A stand-in for BentoML's app behind the API's middlewares (service/service.py): the envelope, then
    admission; the admission middleware is returned (its ``in_flight``)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    gate = asyncio.Event()

    async def score(request):
        body = await request.json()
        if body["texts"] == ["wait"]:
            await gate.wait()
        return JSONResponse({"echo": body, "method": request.method, "ctype": request.headers["content-type"]})

    async def info(request):
        return JSONResponse({"method": request.method, "body": (await request.body()).decode()})

    async def boom(request):
        return PlainTextResponse('Traceback (most recent call last):\n  File "/secret.py"', status_code=500)

    async def bento_400(request):
        return JSONResponse([{"error": "a BentoML-shaped message"}], status_code=400)

    routes = [Route("/score", score, methods=["POST"]), Route("/info", info, methods=["POST"]),
              Route("/boom", boom, methods=["POST"]), Route("/bento", bento_400, methods=["POST"])]
    models = {"/score": REQ.score, "/info": REQ.info}
    admitted = Admission(Starlette(routes=routes), models=models,
                         **{"max_concurrency": 1, "max_body_bytes": 2000, **admission})
    return errors.Envelope(admitted, paths=frozenset(models)), admitted, gate


async def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_guard_rejects_bad_bodies_before_the_app():
    async def main():
        app, _, _ = _app()
        async with await _client(app) as c:
            bad_json = await c.post("/score", content=b'{"texts": [', headers={"content-type": "application/json"})
            bad_field = await c.post("/score", json={"texts": ["ok", "x" * 50]})
            too_big = await c.post("/score", json={"texts": ["y" * 3000]})
            form = await c.post("/score", content=b'{"texts": ["ok"]}',
                                headers={"content-type": "application/x-www-form-urlencoded"})
            wrong_method = await c.get("/score")
            return bad_json, bad_field, too_big, form, wrong_method

    bad_json, bad_field, too_big, form, wrong_method = asyncio.run(main())
    assert bad_json.status_code == 400 and "Invalid JSON" in bad_json.json()["error"]["message"]
    assert bad_field.status_code == 400 and bad_field.json()["error"]["param"] == "texts[1]"
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "payload_too_large"
    assert form.status_code == 200 and form.json()["ctype"] == "application/json"  # `curl -d` works
    assert wrong_method.status_code == 405 and "use POST" in wrong_method.json()["error"]["message"]


def test_guard_sheds_load_with_503_and_serves_get_info():
    async def main():
        app, admitted, gate = _app()
        async with await _client(app) as c:
            first = asyncio.create_task(c.post("/score", json={"texts": ["wait"]}))
            while admitted.in_flight == 0:
                await asyncio.sleep(0.01)
            shed = await c.post("/score", json={"texts": ["ok"]})
            info = await c.get("/info")  # GET /info is not an API call: it is not counted
            gate.set()
            return await first, shed, info, admitted.in_flight

    first, shed, info, in_flight = asyncio.run(main())
    assert first.status_code == 200 and in_flight == 0
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert shed.json()["error"]["type"] == "overloaded"
    assert info.status_code == 200 and info.json() == {"method": "POST", "body": "{}"}


def test_guard_rewrites_foreign_errors_into_the_envelope():
    async def main():
        app, _, _ = _app()
        async with await _client(app) as c:
            return await c.post("/boom"), await c.post("/bento"), await c.get("/nowhere")

    boom, bento, missing = asyncio.run(main())
    assert boom.status_code == 500 and "Traceback" not in boom.text and "secret" not in boom.text
    assert boom.json() == {"error": {"message": "Internal Server Error", "type": "internal_error", "param": None,
                                         "code": None}}
    assert bento.status_code == 400 and bento.json()["error"]["message"] == "a BentoML-shaped message"
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


# ---- generation batching -----------------------------------------------------------------------

def _item(prompt="p", n=2, seed=1, temperature=1.0, max_new_tokens=5):
    return GenerationItem(prompt=prompt, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.9,
                          top_k=10, seed=seed)


def _fake_generate(calls):
    def generate(prompts, settings):
        calls.append(len(prompts))
        return [f"{p}|{s.seed}|{s.max_new_tokens}|{s.temperature}" for p, s in zip(prompts, settings)]
    return generate


def test_each_item_gets_its_n_rows_in_order_with_its_own_settings():
    calls = []
    items = [_item("a", n=3, seed=5), _item("long prompt", n=1, temperature=0, max_new_tokens=9), _item("b", n=2)]
    out = batching.generate_batch(items, _fake_generate(calls), max_rows=2)
    assert [len(x) for x in out] == [3, 1, 2]
    assert out[0] == [f"a|{batching.derive_seed(5, i)}|5|1.0" for i in range(3)]
    assert out[1] == [f"long prompt|{batching.derive_seed(1, 0)}|9|0.0"]
    assert calls == [1, 2, 2, 1]  # greedy apart; sampled rows in calls of at most max_rows


def test_row_seeds_do_not_depend_on_batch_partners_or_n():
    alone = batching.generate_batch([_item("x", n=2, seed=3)], _fake_generate([]), 64)[0]
    crowd = batching.generate_batch([_item("y", n=4, seed=9), _item("x", n=5, seed=3)], _fake_generate([]), 3)[1]
    assert crowd[:2] == alone
    assert len({batching.derive_seed(3, i) for i in range(1000)}) == 1000
    assert batching.derive_seed(1, "round", 0) == batching.derive_seed(1, "round", 0) < 2**63


# ---- /reviews rounds ---------------------------------------------------------------------------

def _fakes(p_of):
    """A generator whose i-th text of a round is f"{round_seed}-{i}" and a scorer that maps text -> p."""
    log = []

    async def generate(count, round_seed):
        log.append(count)
        return [f"{round_seed}-{i}" for i in range(count)]

    async def score(texts):
        return [p_of(t) for t in texts]

    return generate, score, log


def test_reviews_stop_once_n_are_accepted_and_return_the_best_first():
    generate, score, log = _fakes(lambda t: 0.5 + (int(t.split("-")[1]) % 5) / 10)  # 0.5 .. 0.9
    out = asyncio.run(collect_reviews(generate, score, n=2, min_positive=0.8, max_candidates=50, seed=1,
                                      round_cap=16))
    assert out.complete and len(out.reviews) == 2 and out.accepted >= 2
    assert [p for _, p in out.reviews] == sorted((p for _, p in out.reviews), reverse=True)
    assert all(p >= 0.8 for _, p in out.reviews)
    assert log[0] == 4 and out.candidates == sum(log) and out.rounds == len(log)


def test_reviews_within_budget_answer_incomplete():
    generate, score, log = _fakes(lambda t: 0.3)
    out = asyncio.run(collect_reviews(generate, score, n=3, min_positive=0.9, max_candidates=20, seed=1,
                                      round_cap=8))
    assert not out.complete and out.reviews == [] and out.candidates == 20 and out.acceptance_rate == 0
    assert log == [6, 8, 6]  # the prior (1 in 2), then at most round_cap, then what the budget leaves


def test_reviews_never_accept_a_text_twice():
    async def generate(count, round_seed):
        return ["same text"] * count + [" "]

    async def score(texts):
        assert texts == ["same text"]  # deduplicated, blanks dropped, before scoring
        return [0.99]

    out = asyncio.run(collect_reviews(generate, score, n=2, min_positive=0.5, max_candidates=9, seed=0, round_cap=4))
    assert [t for t, _ in out.reviews] == ["same text"] and out.accepted == 1 and not out.complete


def test_seeded_reviews_replay_and_round_sizes_follow_the_acceptance_rate():
    def p_of(text):
        return 0.95 if sum(map(ord, text)) % 3 == 0 else 0.1

    runs = [asyncio.run(collect_reviews(*_fakes(p_of)[:2], n=3, min_positive=0.9, max_candidates=64, seed=42,
                                        round_cap=16)) for _ in range(2)]
    assert runs[0].reviews == runs[1].reviews and runs[0].candidates == runs[1].candidates
    assert round_size(need=3, generated=0, accepted=0, budget_left=100, cap=16) == 6
    assert round_size(need=2, generated=10, accepted=1, budget_left=100, cap=16) == 16
    assert round_size(need=2, generated=10, accepted=5, budget_left=3, cap=16) == 3
    assert round_size(need=4, generated=10, accepted=10, budget_left=100, cap=16) == 4


def test_a_lost_model_connection_is_retried_then_answered_503():
    import aiohttp

    from service.bentoml_compat import retrying

    calls = []

    async def flaky(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise aiohttp.ServerDisconnectedError()
        return [0.5] * len(batch)

    async def down(batch):
        raise aiohttp.ClientOSError("Can not write request body")

    assert asyncio.run(retrying(flaky, ["a", "b"])) == [0.5, 0.5] and len(calls) == 2
    with pytest.raises(aiohttp.ClientConnectionError) as info:
        asyncio.run(retrying(down, ["a"]))
    err = errors.from_exception(info.value)
    assert (err.status, err.type) == (503, "overloaded")


def test_batch_size_one_turns_adaptive_batching_off():
    from service.batching import decorator

    assert decorator(1, 500) == {}  # BentoML refuses batchable APIs with max_batch_size < 2
    assert decorator(8, 500) == {"batchable": True, "max_batch_size": 8, "max_latency_ms": 500}


# ---- /reviews pipeline -------------------------------------------------------------------------

def _pipeline(p_of, *, n, max_candidates, cap=4, delay_seed=0, text_of=lambda i: f"c{i}", tokens=5):
    """A fake engine whose candidate i ends after a random delay (so completion order differs from
    candidate order) with text_of(i) and ``tokens`` tokens; a scorer that maps text -> p."""
    import random

    from service.reviews import Pipeline

    rng = random.Random(delay_seed)
    log = {"waves": [], "closed": [], "scored": []}

    async def rows(first, count):
        log["waves"].append((first, count))
        delays = sorted((rng.random() * 0.02, i) for i in range(first, first + count))
        try:
            waited = 0.0
            for delay, i in delays:
                await asyncio.sleep(delay - waited)
                waited = delay
                yield i, text_of(i), tokens
        finally:
            log["closed"].append(first)

    async def score(texts):
        await asyncio.sleep(rng.random() * 0.005)
        log["scored"] += texts
        return [p_of(t) for t in texts]

    async def run():
        events = [e async for e in Pipeline(rows, score, n=n, min_positive=0.9, max_candidates=max_candidates,
                                            cap=cap).run()]
        return events[:-1], events[-1]

    return asyncio.run(run()), log


def test_the_pipeline_answers_the_first_passing_candidates_in_candidate_order_whatever_the_timing():
    passing = {3, 5, 6, 11, 12}
    answers = set()
    for delay_seed in range(6):
        (accepted, out), log = _pipeline(lambda t: 0.95 if int(t[1:]) in passing else 0.2, n=3,
                                         max_candidates=40, delay_seed=delay_seed)
        assert [a.candidate for a in accepted] == [3, 5, 6] and [a.place for a in accepted] == [0, 1, 2]
        assert out.complete and out.reviews == [(f"c{i}", 0.95) for i in (3, 5, 6)]
        assert out.tokens >= 15 and out.tokens % 5 == 0
        assert out.wasted_tokens == out.tokens - 15
        assert all(first in log["closed"] for first, _ in log["waves"])  # every wave ended or was cancelled
        answers.add(tuple(out.reviews))
    assert len(answers) == 1


def test_the_pipeline_sizes_waves_from_the_acceptance_rate_within_cap_and_budget():
    (accepted, out), log = _pipeline(lambda t: 0.2, n=3, max_candidates=10, cap=4)
    assert accepted == [] and not out.complete and out.candidates == 10 and out.accepted == 0
    assert log["waves"][0] == (0, 4)  # the prior (1 in 2) wants 6, the cap allows 4
    assert sum(c for _, c in log["waves"]) == 10 and out.rounds == len(log["waves"])
    assert out.wasted_tokens == out.tokens == 50


def test_the_pipeline_never_accepts_a_text_twice_and_skips_blanks():
    (accepted, out), _ = _pipeline(lambda t: 0.99, n=2, max_candidates=6,
                                   text_of=lambda i: " " if i == 0 else "same text")
    assert [(a.candidate, a.text) for a in accepted] == [(1, "same text")] and not out.complete


def test_the_pipeline_cancels_candidates_after_the_answer():
    (accepted, out), log = _pipeline(lambda t: 0.95, n=1, max_candidates=40, cap=8)
    assert [a.candidate for a in accepted] == [0] and out.complete
    assert out.candidates <= 8 and out.cancelled + len(set(log["scored"])) >= out.candidates - 1


def test_coalesce_sends_what_arrived_meanwhile_in_one_call_in_order():
    calls = []

    async def score(texts):
        calls.append(list(texts))
        await asyncio.sleep(0.01)
        return [len(t) for t in texts]

    async def main():
        c = batching.Coalesce(score)
        first = asyncio.ensure_future(c(["a"]))
        await asyncio.sleep(0.001)  # the first call is under way
        return [await first, *await asyncio.gather(c(["bb", "ccc"]), c(["dddd"]))]

    assert asyncio.run(main()) == [[1], [2, 3], [4]]
    assert calls == [["a"], ["bb", "ccc", "dddd"]]  # the first alone (no wait), the rest together


def test_coalesce_caps_a_call_and_drops_callers_that_left():
    calls = []

    async def score(texts):
        calls.append(list(texts))
        await asyncio.sleep(0.02)
        return [len(t) for t in texts]

    async def main():
        c = batching.Coalesce(score, max_items=3)
        first = asyncio.ensure_future(c(["a"]))
        await asyncio.sleep(0.001)
        gone = asyncio.ensure_future(c(["gone"]))
        rest = [asyncio.ensure_future(c(x)) for x in (["bb", "ccc"], ["dddd"], ["e" * 5, "f" * 6, "g" * 7, "h" * 8])]
        await asyncio.sleep(0.001)
        gone.cancel()  # left before its call: never sent
        return [await first, *await asyncio.gather(*rest)]

    assert asyncio.run(main()) == [[1], [2, 3], [4], [5, 6, 7, 8]]
    # at most 3 texts a call, unless one caller's list alone is longer; order kept
    assert calls == [["a"], ["bb", "ccc", "dddd"], ["eeeee", "ffffff", "ggggggg", "hhhhhhhh"]]


def test_coalesce_a_call_cancelled_from_elsewhere_fails_its_callers():
    async def score(texts):
        raise asyncio.CancelledError  # as a client library might, cancelled under the caller

    async def main():
        c = batching.Coalesce(score)
        with pytest.raises(RuntimeError, match="scoring call was cancelled"):
            await asyncio.wait_for(c(["a"]), 5)  # an error, not a wait for ever

    asyncio.run(main())


def test_coalesce_depth_two_sends_the_next_call_while_one_runs():
    calls, running = [], []

    async def score(texts):
        calls.append((list(texts), len(running)))
        running.append(1)
        await asyncio.sleep(0.2 if texts == ["bb"] else 0.02)  # "bb"'s call outlasts the first one's
        running.pop()
        return [len(t) for t in texts]

    async def main():
        c = batching.Coalesce(score, depth=2)
        first = asyncio.ensure_future(c(["a"]))
        await asyncio.sleep(0.001)
        second = asyncio.ensure_future(c(["bb"]))  # goes at once: one call under way, two allowed
        await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(c(["ccc"])), asyncio.ensure_future(c(["dddd"]))]  # wait for a free call
        return [await first, await second, *await asyncio.gather(*rest)]

    assert asyncio.run(main()) == [[1], [2], [3], [4]]
    assert calls == [(["a"], 0), (["bb"], 1), (["ccc", "dddd"], 1)]


def test_coalesce_cancels_a_call_nobody_waits_for():
    started, finished = [], []

    async def score(texts):
        started.append(list(texts))
        await asyncio.sleep(0.05)
        finished.append(list(texts))
        return [0.5] * len(texts)

    async def main():
        c = batching.Coalesce(score)
        a, b = asyncio.ensure_future(c(["a"])), asyncio.ensure_future(c(["b"]))
        await asyncio.sleep(0.01)  # one call carrying both is under way
        a.cancel()
        await asyncio.sleep(0.001)
        assert len(started) == 1 and not finished  # b still waits: the call goes on
        b.cancel()
        await asyncio.sleep(0.1)
        return await c(["c"])  # the coalescer still serves

    assert asyncio.run(main()) == [0.5]
    assert started == [["a", "b"], ["c"]] and finished == [["c"]]  # the abandoned call stopped


def test_model_threads_default_to_half_of_the_cores_a_container_may_use(tmp_path, monkeypatch):
    from service import settings as S

    monkeypatch.setattr(S.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert S.available_cores(tmp_path / "no-cgroup") == 16
    (tmp_path / "cpu.max").write_text("200000 100000\n")  # a container limited to 2 CPUs on a 16-core host
    assert S.available_cores(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert S.available_cores(tmp_path) == 2  # 1.5 CPUs: rounded up
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert S.available_cores(tmp_path) == 16
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert S.available_cores(v1) == 4
    monkeypatch.setattr(S, "available_cores", lambda: 8)
    assert S.get_settings().model_threads() == 4
    assert S.get_settings(threads=3).model_threads() == 3
    monkeypatch.setattr(S, "available_cores", lambda: 1)
    assert S.get_settings().model_threads() == 1


def test_int8_precisions_are_refused_on_cuda_at_start_up():
    from service.settings import get_settings

    for field in ("classifier_precision", "generator_precision"):
        with pytest.raises(ValueError, match=f"GLOWING_{field.upper()}=int8 is the CPU format"):
            get_settings(device="cuda", **{field: "int8"})
    assert get_settings(generator_precision="int8").generator_precision == "int8"


def test_freeze_heap_takes_the_start_up_heap_out_of_the_collector_and_still_collects_later_garbage():
    import gc
    import weakref

    from service import loading

    class Node:
        pass

    kept = Node()
    kept.self = kept  # a cycle alive at start-up: frozen, never walked again
    pauses: list[float] = []
    try:
        loading.freeze_heap(pauses.append)
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # out of every generation the collector walks
        later = Node()
        later.self = later  # garbage made after start-up is collected as before
        gone = weakref.ref(later)
        del later
        gc.collect(0)  # a young collection: not a full one, not reported
        assert gone() is None and len(pauses) == 1  # the start-up collection
        gc.collect()
        assert len(pauses) == 2 and all(0 <= p < 10 for p in pauses)
        loading.freeze_heap(pauses.append)  # again (a test builds the services twice): one callback, not two
        gc.collect()
        assert len(pauses) == 4
    finally:
        gc.callbacks.remove(loading._on_full_collection)
        gc.unfreeze()
