"""The BentoML services in-process on the exported tiny models: ``bentoml.depends`` gives in-process
ScorerService and GeneratorService instances, and each endpoint is awaited directly (no HTTP; see
test_service_http.py for the served stack)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from service import loading
from service.settings import get_settings

SAMPLING = dict(prompt="This movie", max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50)
TEXTS = ["Great film.", "Awful, boring, a waste of time.", "It was fine.<br /><br />Not more.",
         " ".join(["The plot was moving and the cast was wonderful."] * 30)]


@pytest.fixture(scope="module")
def svc(exported):
    from _bentoml_sdk.service.dependency import cleanup

    from service.service import Glowing

    frozen = []  # each service freezes its start-up heap (service/loading.py freeze_heap)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLOWING_ARTIFACTS", str(exported))
        mp.setattr(loading, "freeze_heap", lambda observe: frozen.append(observe))
        instance = Glowing()
        _ = instance.scorer, instance.generator  # load both models now, with this environment
        assert len(frozen) == 3, frozen
        yield instance
    asyncio.run(cleanup())  # bentoml.depends caches the instances on the class


def run(coro):
    return asyncio.run(coro)


def test_score_answers_labels_and_probabilities_in_order(svc):
    out = run(svc.score(texts=TEXTS))
    assert len(out.results) == len(TEXTS)
    for r in out.results:
        assert 0 <= r.p_positive <= 1 and r.label == ("positive" if r.p_positive >= 0.5 else "negative")


def test_a_score_is_identical_alone_and_inside_a_batch(svc):
    batch = [r.p_positive for r in run(svc.score(texts=TEXTS * 3)).results]
    alone = [run(svc.score(texts=[t])).results[0].p_positive for t in TEXTS]
    assert batch == alone * 3  # exactly: right padding, and fp32 (int8 would move with the batch)


def test_seeded_generation_is_reproducible_and_scored(svc):
    first = run(svc.generate(n=3, seed=11, **SAMPLING))
    again = run(svc.generate(n=3, seed=11, **SAMPLING))
    other = run(svc.generate(n=3, seed=12, **SAMPLING))
    assert first == again and first.seed == 11 and len(first.reviews) == 3
    assert [r.text for r in first.reviews] != [r.text for r in other.reviews]
    assert all(r.text.startswith("This movie") for r in first.reviews)
    fewer = run(svc.generate(n=2, seed=11, **SAMPLING))
    assert fewer.reviews == first.reviews[:2]  # row i has its own seed, whatever n is
    scores = [r.p_positive for r in run(svc.score(texts=[r.text for r in first.reviews])).results]
    assert scores == [r.p_positive for r in first.reviews]


def test_an_unseeded_request_returns_the_seed_that_replays_it(svc):
    drawn = run(svc.generate(n=2, seed=None, **SAMPLING))
    assert run(svc.generate(n=2, seed=drawn.seed, **SAMPLING)) == drawn


def test_reviews_returns_the_first_passing_candidates_with_stats(svc):
    out = run(svc.reviews(n=3, min_positive=0.0, max_candidates=12, seed=5, **SAMPLING))
    assert out.complete and len(out.reviews) == 3 and out.stats.rounds == 1  # one wave of 6 (a prior of 1 in 2)
    assert out.stats.candidates == 6 and out.stats.accepted == 3 and out.stats.elapsed_ms > 0
    assert out.stats.wasted_tokens >= 0 and out.stats.cancelled <= 3
    again = run(svc.reviews(n=3, min_positive=0.0, max_candidates=12, seed=5, **SAMPLING))
    assert again.reviews == out.reviews
    # everything passes: the answer is candidates 0, 1 and 2, which /generate's rows are not (other seeds)
    from service.batching import derive_seed

    first = run(svc.generate(n=3, seed=5, **SAMPLING))
    assert [r.text for r in first.reviews] != [r.text for r in out.reviews]
    assert derive_seed(5, "candidates") != 5


def test_reviews_in_rounds_returns_the_best_first(svc, monkeypatch):
    monkeypatch.setattr(svc, "settings", svc.settings.model_copy(update={"reviews": "rounds"}))
    out = run(svc.reviews(n=3, min_positive=0.0, max_candidates=12, seed=5, **SAMPLING))
    assert out.complete and len(out.reviews) == 3 and out.stats.rounds == 1
    ps = [r.p_positive for r in out.reviews]
    assert ps == sorted(ps, reverse=True)
    assert out.stats.candidates == 6 and out.stats.accepted >= 3 and out.stats.wasted_tokens > 0


def test_reviews_out_of_budget_is_an_answer_not_an_error(svc):
    out = run(svc.reviews(n=2, min_positive=1.0, max_candidates=7, seed=1, **SAMPLING))
    assert not out.complete and out.reviews == []
    assert out.stats.candidates == 7 and out.stats.accepted == 0 and out.stats.rounds >= 2


def test_info_reports_models_providers_batching_and_metrics(svc):
    info = run(svc.info())
    for kind in ("classifier", "generator"):
        model = info.models[kind]
        assert model["providers"] == ["CPUExecutionProvider"] and model["precision"] == "fp32"
        assert len(model["version"]) == 12 and model["file"] == f"onnx/{kind}/model.onnx"
    assert info.batching["classifier"]["max_batch_size"] == get_settings().scorer_max_batch_size
    assert "classifier.imdb_test.accuracy" in info.metrics and "export.int8_accuracy" in info.metrics
    json.dumps(info.model_dump())  # serialisable as it is


def test_a_failing_model_call_answers_500_in_the_envelope(svc, monkeypatch):
    async def broken(texts):
        raise RuntimeError("/secret/model.onnx: ONNXRuntimeError")

    monkeypatch.setattr(svc.scorer.to_async, "score", broken)
    resp = run(svc.score(texts=["x"]))
    body = json.loads(resp.body)
    assert resp.status_code == 500 and body["error"]["type"] == "internal_error"
    assert "secret" not in resp.body.decode() and "Traceback" not in resp.body.decode()


# ---- start-up errors ---------------------------------------------------------------------------

@pytest.fixture()
def broken_copy(exported, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(exported, root, ignore=shutil.ignore_patterns("lm", "baseline", "reports", "*.failed"))
    return root


def test_preflight_names_the_missing_file_and_the_command(broken_copy):
    assert len(loading.preflight(get_settings(artifacts=broken_copy))) == 2
    shutil.rmtree(broken_copy / "onnx" / "generator")
    with pytest.raises(loading.StartupError, match=r"onnx/generator.*does not exist.*python -m export.*make serve"):
        loading.preflight(get_settings(artifacts=broken_copy))
    (broken_copy / "manifest.json").unlink()
    with pytest.raises(loading.StartupError, match=r"manifest.json is missing.*make models"):
        loading.preflight(get_settings(artifacts=broken_copy))


def test_a_corrupt_model_stops_preflight_and_loading(broken_copy):
    weights = broken_copy / "onnx" / "classifier" / "model.onnx"
    weights.write_bytes(weights.read_bytes()[:2000])
    settings = get_settings(artifacts=broken_copy)
    with pytest.raises(loading.StartupError, match=r"classifier/model.onnx: differs from the file the export "
                                                  r"recorded.*make serve"):
        loading.preflight(settings)
    with pytest.raises(loading.StartupError, match=r"classifier/model.onnx: ONNX Runtime cannot load it"):
        loading.load("classifier", settings)
    (broken_copy / "manifest.json").write_text("{not json")
    with pytest.raises(loading.StartupError, match=r"manifest.json is not valid JSON"):
        loading.preflight(settings)


def test_the_torch_backend_serves_the_trained_models(exported, svc):
    settings = get_settings(artifacts=exported, backend="torch")
    assert len(loading.preflight(settings)) == 2
    scorer = loading.load("classifier", settings)
    onnx = [r.p_positive for r in run(svc.score(texts=TEXTS)).results]
    assert scorer.score(TEXTS) == pytest.approx(onnx, abs=1e-4)
    assert loading.describe("classifier", scorer, settings)["file"] == "classifier/model.safetensors"


def test_int8_scores_do_not_depend_on_the_batch_either(exported):
    scorer = loading.load("classifier", get_settings(artifacts=exported, classifier_precision="int8"))
    assert scorer.info()["precision"] == "int8" and scorer.info()["batch_size"] == 1
    assert scorer.score(TEXTS * 2) == [scorer.score([t])[0] for t in TEXTS] * 2
