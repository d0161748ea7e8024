"""The runtime layer on the exported tiny models: scoring, generation, providers and file errors."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from glowing.runtime import DeviceError, ModelFileError, SamplingSettings, load_generator, load_scorer
from glowing.runtime.generator import Generator
from glowing.runtime.sampling import make_rng, next_tokens, sample_row

SHORT = "Great film."
LONG = " ".join(["The plot was moving and the cast was wonderful, though the ending dragged."] * 20)
TEXTS = [SHORT, "Awful, boring, a waste of time.", LONG, "It was fine.<br /><br />Not more.", ""]
PROMPTS = ["This movie", "I went to see this film with my", "", "Great"]


@pytest.fixture(scope="module")
def scorers(exported):
    return {"onnx-fp32": load_scorer(exported / "onnx" / "classifier", "onnx", "cpu", "fp32"),
            "onnx-int8": load_scorer(exported / "onnx" / "classifier", "onnx", "cpu", "int8"),
            "torch": load_scorer(exported / "classifier", "torch", "cpu")}


@pytest.fixture(scope="module")
def generators(exported):
    return {"onnx": load_generator(exported / "onnx" / "generator", "onnx", "cpu"),
            "torch": load_generator(exported / "generator", "torch", "cpu")}


# ---- scoring ---------------------------------------------------------------------------------

def test_scores_are_probabilities_in_order_and_backends_agree(scorers):
    onnx, torch_ = np.array(scorers["onnx-fp32"].score(TEXTS)), np.array(scorers["torch"].score(TEXTS))
    assert onnx.shape == (len(TEXTS),) and ((onnx > 0) & (onnx < 1)).all()
    assert np.abs(onnx - torch_).max() < 1e-5
    reversed_ = scorers["onnx-fp32"].score(TEXTS[::-1])
    assert np.allclose(reversed_[::-1], onnx, atol=1e-6)
    assert scorers["onnx-fp32"].score([]) == []


@pytest.mark.parametrize("name", ["onnx-fp32", "onnx-int8", "torch"])
def test_score_does_not_depend_on_batch_partners(scorers, name):
    scorer = scorers[name]
    alone = scorer.score([SHORT])[0]
    partnered = scorer.score([LONG, SHORT, LONG + " More.", "Bad."])[1]
    assert abs(alone - partnered) < 1e-6


def test_truncation_at_max_length_and_normalization(scorers):
    scorer = scorers["onnx-fp32"]
    assert max(len(ids) for ids in scorer.encode(TEXTS)) == scorer.max_length
    assert scorer.score([LONG])[0] == pytest.approx(scorer.score([LONG + " Terrible awful worst."])[0], abs=1e-7)
    assert scorer.score(["Good.<br />Bad."])[0] == pytest.approx(scorer.score(["Good.\nBad."])[0], abs=1e-7)


def test_int8_rows_in_parallel_score_as_one_at_a_time(exported):
    parallel = load_scorer(exported, "onnx", "cpu", "int8", threads=3)
    serial = load_scorer(exported, "onnx", "cpu", "int8", threads=1)
    assert (parallel.row_workers, serial.row_workers) == (3, 1)
    assert parallel.score(TEXTS * 3) == serial.score(TEXTS * 3)


@pytest.mark.parametrize("max_length", [8, 13, 48])
def test_encoding_equals_transformers_tokenizer(exported, export_data_dir, max_length):
    """The scorer tokenizes only the head of a long text: the ids must still be those of the whole."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from glowing.text import normalize

    texts = pq.read_table(export_data_dir / "imdb" / "test.parquet").column("text").to_pylist()[:200]
    texts += [LONG, LONG.replace(" ", "  "), "x" * 500, "word " * 300, "<br />" * 40, ""]
    scorer = load_scorer(exported / "onnx" / "classifier", "onnx", "cpu", max_length=max_length)
    reference = AutoTokenizer.from_pretrained(exported / "onnx" / "classifier")
    expected = reference([normalize(t) for t in texts], truncation=True, max_length=max_length)["input_ids"]
    assert scorer.encode(texts) == expected


def test_scorer_reports_what_it_runs(scorers, exported):
    scorer = scorers["onnx-int8"]
    assert (scorer.backend, scorer.precision, scorer.providers) == ("onnx", "int8", ["CPUExecutionProvider"])
    assert scorer.batch_size == 1 and scorers["onnx-fp32"].batch_size == 32  # int8: one text per call
    info = scorer.info()
    assert info["model_file"].endswith("model_quantized.onnx") and info["max_length"] == scorer.max_length
    assert scorers["torch"].providers == ["torch:cpu"]
    root = load_scorer(exported, "onnx", "cpu")  # an artifacts root resolves to onnx/classifier
    assert root.model_file == exported / "onnx" / "classifier" / "model.onnx"


# ---- providers -------------------------------------------------------------------------------

def test_cpu_provider_is_logged(exported, caplog):
    caplog.set_level(logging.INFO, logger="glowing.runtime")
    scorer = load_scorer(exported, "onnx", "auto", "fp32")
    assert scorer.providers == ["CPUExecutionProvider"]
    assert "ONNX Runtime providers ['CPUExecutionProvider']" in caplog.text
    assert "model.onnx" in caplog.text


def test_cuda_request_without_cuda_raises(exported):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        load_scorer(exported, "onnx", "cuda", "fp32")
    with pytest.raises(DeviceError, match="int8 is the CPU format"):
        load_scorer(exported, "onnx", "cuda", "int8")
    with pytest.raises(DeviceError, match="CUDA"):
        load_generator(exported, "torch", "cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_silent_cuda_fallback_is_an_error(exported, monkeypatch, caplog):
    """onnxruntime-gpu without its CUDA libraries starts on CPU after a log line: simulated here by
    a provider list that claims CUDA on a CPU-only build."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="fell back"):
        load_scorer(exported, "onnx", "cuda", "fp32")
    caplog.set_level(logging.WARNING, logger="glowing.runtime")
    scorer = load_scorer(exported, "onnx", "auto", "fp32")  # auto: CPU, but not silently
    assert scorer.providers == ["CPUExecutionProvider"] and "did not start" in caplog.text


# ---- generation ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_seeded_generation_is_reproducible(generators, backend):
    gen = generators[backend]
    settings = SamplingSettings(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=11)
    first = gen.generate(PROMPTS, settings)
    assert first == gen.generate(PROMPTS, settings)
    assert len(first) == len(PROMPTS) and all(isinstance(t, str) for t in first)
    other = gen.generate(PROMPTS, SamplingSettings(max_new_tokens=16, temperature=1.0, seed=12))
    assert other != first


def test_a_row_does_not_depend_on_its_batch(generators):
    gen = generators["onnx"]
    mine = SamplingSettings(max_new_tokens=12, temperature=0.8, top_k=40, seed=5)
    alone = gen.generate(["I went to see this film with my"], mine)[0]
    partners = [SamplingSettings(max_new_tokens=3, temperature=1.5, seed=1), mine,
                SamplingSettings(max_new_tokens=20, temperature=0)]
    batch = gen.generate(["Great", "I went to see this film with my", LONG[:200]], partners)
    assert batch[1] == alone


def test_greedy_generation_matches_between_backends(generators):
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    assert generators["onnx"].generate_ids(PROMPTS, greedy) == generators["torch"].generate_ids(PROMPTS, greedy)


def test_per_row_max_new_tokens_and_context_guard(generators):
    gen = generators["onnx"]
    rows = [SamplingSettings(max_new_tokens=n, seed=0) for n in (0, 1, 5)]
    ids = gen.generate_ids(["a", "b", "c"], rows)
    assert ids[0] == [] and len(ids[1]) <= 1 and len(ids[2]) <= 5
    # a prompt longer than the context is cut from the left; asking more than the context is clipped
    huge = gen.generate([LONG * 3], SamplingSettings(max_new_tokens=gen.n_positions * 2, seed=0))
    assert len(huge) == 1
    with pytest.raises(ValueError, match="one per prompt"):
        gen.generate(["a", "b"], [SamplingSettings()])


class _ScriptedLM:
    """Predicts ``script[row][step]`` with certainty; records how the batch shrinks."""

    def __init__(self, script, vocab=16):
        self.script, self.vocab, self.batches = script, vocab, []

    def _logits(self, rows, step):
        logits = np.full((len(rows), self.vocab), -10.0, dtype=np.float32)
        for j, r in enumerate(rows):
            logits[j, self.script[r][min(step, len(self.script[r]) - 1)]] = 10.0
        return logits

    def forward(self, input_ids, attention_mask, position_ids, past):
        rows, step = (list(range(len(input_ids))), 0) if past is None else past
        self.batches.append(len(rows))
        assert (position_ids[:, -1] == attention_mask.sum(axis=1) - 1).all()  # positions count real tokens
        return self._logits(rows, step), (rows, step + 1)

    def select(self, past, keep):
        rows, step = past
        return [rows[k] for k in keep], step


def test_rows_stop_at_end_of_text_individually(exported):
    codec_source = load_generator(exported / "onnx" / "generator", "onnx", "cpu")
    eos = 0
    lm = _ScriptedLM([[5, 6, eos], [7, 8, 9, 10, 11, eos], [eos]])
    gen = Generator(lm, codec_source._codec, n_positions=64, eos_ids={eos}, info={})
    ids = gen.generate_ids(["a", "bb bb", "c"], SamplingSettings(max_new_tokens=10, temperature=0))
    assert ids == [[5, 6], [7, 8, 9, 10, 11], []]
    assert lm.batches == [3, 2, 2, 1, 1, 1]  # finished rows leave the batch at once


# ---- sampling --------------------------------------------------------------------------------

def test_sampler_filters_and_is_seeded():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert sample_row(logits, SamplingSettings(temperature=0), make_rng(0)) == 0
    assert {sample_row(logits, SamplingSettings(top_k=1, seed=0), make_rng(i)) for i in range(20)} == {0}
    assert {sample_row(logits, SamplingSettings(top_k=2), make_rng(i)) for i in range(200)} == {0, 1}
    assert {sample_row(logits, SamplingSettings(top_p=0.7), make_rng(i)) for i in range(200)} == {0, 1}
    draws = [sample_row(logits, SamplingSettings(), make_rng(i)) for i in range(4000)]
    assert np.allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    rows = [SamplingSettings(seed=1), SamplingSettings(temperature=0)]
    batch = np.stack([logits, logits[::-1]])
    assert next_tokens(batch, rows, [make_rng(1), make_rng(2)])[1] == 3


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -1),
                                         ("max_new_tokens", -1), ("seed", -3)])
def test_invalid_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingSettings(**{field: value})


# ---- files -----------------------------------------------------------------------------------

def test_missing_files_are_named_with_the_fix(exported, tmp_path):
    onnx_dir = tmp_path / "onnx" / "classifier"
    shutil.copytree(exported / "onnx" / "classifier", onnx_dir)
    (onnx_dir / "model_quantized.onnx").unlink()
    with pytest.raises(ModelFileError, match=r"model_quantized\.onnx.*missing.*python -m export --artifacts") as err:
        load_scorer(onnx_dir, "onnx", "cpu", "int8")
    assert err.value.path == onnx_dir / "model_quantized.onnx"
    with pytest.raises(ModelFileError, match="does not exist"):
        load_generator(tmp_path / "nowhere", "onnx", "cpu")
    torch_dir = tmp_path / "classifier"
    shutil.copytree(exported / "classifier", torch_dir)
    (torch_dir / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"model\.safetensors.*python -m training"):
        load_scorer(torch_dir, "torch", "cpu")


def test_corrupt_files_are_named(exported, tmp_path):
    gen_dir = tmp_path / "onnx" / "generator"
    shutil.copytree(exported / "onnx" / "generator", gen_dir)
    model = gen_dir / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"generator/model\.onnx: ONNX Runtime cannot load it") as err:
        load_generator(gen_dir, "onnx", "cpu")
    assert err.value.path == model
    (gen_dir / "tokenizer.json").write_text('{"not": "a tokenizer"')
    with pytest.raises(ModelFileError, match=r"tokenizer\.json: the tokenizer is unreadable"):
        load_generator(gen_dir, "onnx", "cpu")
    clf_dir = tmp_path / "onnx" / "classifier"
    shutil.copytree(exported / "onnx" / "classifier", clf_dir)
    shutil.copy(exported / "onnx" / "generator" / "model.onnx", clf_dir / "model.onnx")
    with pytest.raises(ModelFileError, match="not a text-classification model"):
        load_scorer(clf_dir, "onnx", "cpu")


@pytest.mark.slow
def test_importing_the_runtime_and_serving_onnx_do_not_load_torch(exported):
    code = ("import sys; import glowing.runtime as r; assert 'onnxruntime' not in sys.modules; "
            "assert 'torch' not in sys.modules; "
            f"s = r.load_scorer({str(exported)!r}, 'onnx', 'cpu', 'int8'); s.score(['ok']); "
            f"g = r.load_generator({str(exported)!r}, 'onnx', 'cpu'); g.generate(['a'], r.SamplingSettings(4)); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
