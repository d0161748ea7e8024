"""Several processes: the lm, generator and classifier stages under torchrun (gloo, 2 CPU processes) match one
process with the same global batch, and only rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import tiny_args

ROOT = Path(__file__).resolve().parents[1]
STAGES = "tokenizer,lm,generator,classifier"


def _train(data: Path, out: Path, nproc: int) -> dict:
    # dropout draws differ per rank; the rest must not
    args = tiny_args(data, out, "--stages", STAGES, "--set", "classifier.dropout=0.0")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "training", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    one = _train(tiny_data_dir, tmp_path / "one", 1)
    two = _train(tiny_data_dir, tmp_path / "two", 2)
    # Same initial weights, same global batches: the first loss is the same number, and after a few
    # steps the losses differ only by floating-point summation order.
    for stage in ("lm", "generator"):
        a, b = one["models"][stage], two["models"][stage]
        assert b["first_loss"] == pytest.approx(a["first_loss"], abs=1e-4), stage
        assert b["last_loss"] == pytest.approx(a["last_loss"], abs=1e-3), stage
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-3), stage
    c1, c2 = one["models"]["classifier"]["epochs"], two["models"]["classifier"]["epochs"]
    assert [e["train_loss"] for e in c2] == pytest.approx([e["train_loss"] for e in c1], abs=2e-3)
    # Rank 0 wrote everything once, and what it wrote loads.
    assert set(two["stages"]) == set(STAGES.split(","))
    assert not list((tmp_path / "two").glob(".*.tmp"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "two/generator")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two/classifier")
    tok = AutoTokenizer.from_pretrained(tmp_path / "two/classifier")
    logits = model(**tok(["great wonderful film"], return_tensors="pt")).logits
    assert np.isfinite(logits.detach().numpy()).all()
