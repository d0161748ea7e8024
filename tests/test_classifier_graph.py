"""The classifier's rebuilt scoring graph (export/classifier_graph.py) computes what PyTorch computes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export import classifier_graph


def _classifier(tmp_path, layers: int, pad_token_id: int | None, **config):
    """A random GPT-2 sequence classifier saved like the trained one (no training: weights only)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(layers)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=97, n_positions=40, n_embd=32, n_layer=layers,
                                                     n_head=4, num_labels=2, pad_token_id=pad_token_id, **config))
    with torch.no_grad():  # layer norms and biases away from their initial 1 and 0: every term counts
        for name, p in model.named_parameters():
            if name.endswith((".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path / f"clf{layers}"
    model.eval().save_pretrained(path)
    return model, path


def _onnx_logits(path, input_ids, mask):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("layers,pad,config", [(1, 1, {}), (3, 1, {}), (2, None, {}),
                                               (2, 1, {"scale_attn_by_inverse_layer_idx": True})])
def test_rebuilt_graph_scores_what_pytorch_scores(tmp_path, layers, pad, config):
    import torch

    model, path = _classifier(tmp_path, layers, pad, **config)
    out = tmp_path / "model.onnx"
    assert classifier_graph.build(path, out) and classifier_graph.is_rebuilt(out)
    rng = np.random.default_rng(layers)
    lengths = [1, 5, 17, 33, 40]  # right padded to the longest, as the scorer pads; one at the full context
    input_ids = np.full((len(lengths), max(lengths)), pad if pad is not None else 0, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = rng.integers(2, 97, n)
        mask[row, :n] = 1
    if pad is None:  # transformers pools the last position then: score full rows only
        input_ids, mask = input_ids[-1:], mask[-1:]
    with torch.inference_mode():
        expected = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = _onnx_logits(out, input_ids, mask)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    if pad is not None:  # a row's logits do not depend on its partners' lengths
        for row, n in enumerate(lengths):
            alone = _onnx_logits(out, input_ids[row : row + 1, :n], mask[row : row + 1, :n])
            np.testing.assert_allclose(alone[0], got[row], atol=1e-5)


def test_a_checkpoint_it_does_not_cover_keeps_the_fused_graph(tmp_path, caplog):
    _, path = _classifier(tmp_path, 1, 1)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "model.onnx"
    assert classifier_graph.build(path, out) is False and not out.exists()
    assert "not GPT2ForSequenceClassification" in caplog.text
