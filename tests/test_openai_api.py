"""The OpenAI-compatible API through the official ``openai`` client (the ``openai`` extra) against a
real ``bentoml serve`` of the tiny export, with an API key: a completion, n > 1, seed replay,
streaming, the min_positive extension through ``extra_body``, /v1/models, a wrong key and fields we
refuse. About 40 s on 2 CPU cores."""

from __future__ import annotations

import httpx
import pytest

from service.openai_protocol import MODEL_ID, StopCutter, completion_request
from service.settings import Settings

openai = pytest.importorskip("openai")
KEY = "openai-test-key-7d2e"
SERVER_ENV = {"GLOWING_API_KEY": KEY, "GLOWING_MAX_CONCURRENCY": "64"}  # conftest.py's `server`


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_a_completion_with_n_choices_each_scored_and_a_seed_that_replays(client, server):
    out = client.completions.create(model=MODEL_ID, prompt="This movie", max_tokens=8, n=3, seed=11)
    assert out.object == "text_completion" and out.model == MODEL_ID and out.id.startswith("cmpl-")
    assert [c.index for c in out.choices] == [0, 1, 2] and len({c.text for c in out.choices}) > 1
    assert all(c.finish_reason in ("stop", "length") and 0 <= c.p_positive <= 1 for c in out.choices)
    assert out.usage.completion_tokens > 0 and out.usage.total_tokens > out.usage.completion_tokens
    again = client.completions.create(model=MODEL_ID, prompt="This movie", max_tokens=8, n=3, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    # the same rows as /generate with that seed, prompt excluded
    plain = server.post("/generate", {"prompt": "This movie", "n": 3, "max_new_tokens": 8, "temperature": 1.0,
                                      "top_p": 1.0, "top_k": 0, "seed": 11},
                        headers={"Authorization": f"Bearer {KEY}"}).json()
    assert ["This movie" + c.text for c in out.choices] == [r["text"] for r in plain["reviews"]]


def test_streamed_chunks_add_up_to_the_plain_completion(client):
    body = dict(model=MODEL_ID, prompt=["This movie", "The film"], max_tokens=8, n=2, seed=3)
    plain = client.completions.create(**body)
    texts, finish = {}, {}
    for chunk in client.completions.create(**body, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = (c.finish_reason, c.p_positive)
    assert [texts[i] for i in range(4)] == [c.text for c in plain.choices]
    assert [finish[i] for i in range(4)] == [(c.finish_reason, c.p_positive) for c in plain.choices]


def test_min_positive_through_extra_body_answers_the_accepted_reviews(client, server):
    out = client.completions.create(model=MODEL_ID, prompt="This movie", max_tokens=8, n=2, seed=5,
                                    extra_body={"min_positive": 0.3, "max_candidates": 12})
    assert len(out.choices) <= 2 and all(c.p_positive >= 0.3 for c in out.choices)
    reviews = server.post("/reviews", {"prompt": "This movie", "n": 2, "max_new_tokens": 8, "temperature": 1.0,
                                       "top_p": 1.0, "top_k": 0, "seed": 5, "min_positive": 0.3,
                                       "max_candidates": 12}, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert ["This movie" + c.text for c in out.choices] == [r["text"] for r in reviews["reviews"]]
    assert out.model_extra["reviews"]["0"]["stats"]["candidates"] == reviews["stats"]["candidates"]
    streamed = [c for chunk in client.completions.create(model=MODEL_ID, prompt="This movie", max_tokens=8, n=2,
                                                          seed=5, stream=True,
                                                          extra_body={"min_positive": 0.3, "max_candidates": 12})
                for c in chunk.choices]
    assert [(c.text, c.p_positive) for c in streamed] == [(c.text, c.p_positive) for c in out.choices]


def test_models_lists_the_generator_with_its_version(client):
    [model] = client.models.list().data
    assert model.id == MODEL_ID and model.object == "model" and len(model.model_extra["version"]) == 12


def test_a_wrong_key_is_an_authentication_error(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL_ID, prompt="x", max_tokens=2)


@pytest.mark.parametrize("extra, param", [({"best_of": 3}, "best_of"), ({"echo": True}, "echo"),
                                          ({"suffix": "end"}, "suffix"), ({"logit_bias": {"50256": -100}}, "logit_bias"),
                                          ({"logprobs": 2}, "logprobs"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
                                          ({"no_such_field": 1}, "no_such_field"), ({"n": 999}, "n"),
                                          ({"max_candidates": 8}, "max_candidates")])
def test_fields_we_do_not_implement_are_a_bad_request_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2, extra_body=extra)
    error = info.value.body
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


def test_neutral_values_of_unimplemented_fields_are_accepted():
    Request = completion_request(Settings())
    req = Request.model_validate({"model": MODEL_ID, "prompt": "x", "n": 2, "best_of": 2, "echo": False,
                                  "presence_penalty": 0, "logit_bias": {}})
    assert req.best_of == 2


def test_stop_strings_cut_a_stream_wherever_its_deltas_split():
    for pieces in (["a good fi", "lm. The end"], ["a good film", ". The", " end"], list("a good film. The end")):
        cut = StopCutter([". The", "zzz"])
        text = "".join(cut.feed(p) for p in pieces) + cut.finish()
        assert text == "a good film" and cut.stopped
    plain = StopCutter([])
    assert plain.feed("abc") == "abc" and plain.finish() == "" and not plain.stopped


def test_plain_http_errors_are_openai_shaped(server):
    resp = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_ID}, timeout=10,
                      headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 400 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
