"""``python -m export.bench_attention``: its GroupQueryAttention graph computes what the served decoding
graph computes (on the exported tiny generator), and the probe prints its table."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np


def test_ragged_graph_decodes_what_the_served_graph_decodes(exported):
    from export.bench_attention import Ragged, check
    from glowing.runtime import load_generator

    model_dir = exported / "onnx" / "generator"
    generator = load_generator(model_dir, threads=1)
    ragged = Ragged(model_dir / "model.onnx", json.loads((model_dir / "config.json").read_text()))
    same, gap = check(generator, ragged)
    assert same == 4 and gap < 1e-4
    # rows of different lengths in one call: each row's logits are those it gets alone
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    together, _, _ = ragged.prefill(prompts, generator.n_positions)
    for row, prompt in enumerate(prompts):
        alone, _, _ = ragged.prefill([prompt], generator.n_positions)
        np.testing.assert_allclose(together[row], alone[0], atol=1e-5)


def test_probe_prints_its_table(exported):
    from export.bench_attention import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--artifacts", str(exported), "--rows", "2,3", "--widths", "8", "--repeats", "2"]) == 0
    text = printed.getvalue()
    assert "identical to the served graph on 4/4 prompts" in text
    assert "| 2 |" in text and "| 3 |" in text and "MHA at 8" in text
