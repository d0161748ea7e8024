"""Export the trained models to ONNX with Optimum.

* classifier: task ``text-classification`` -> ``classifier/model.onnx`` (inputs ``input_ids``,
  ``attention_mask``; output ``logits``), with the tokenizer, config and ``max_length.txt``;
* generator: task ``text-generation-with-past`` -> ``generator/model.onnx``, ONE merged graph
  with the KV cache (inputs ``input_ids``, ``attention_mask``, ``position_ids``,
  ``past_key_values.{i}.key|value``; outputs ``logits``, ``present.{i}.key|value``; the first
  step takes a cache of length 0).

Optimum's own validation is off: ``export.parity`` checks more, on real reviews.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

from glowing import artifacts as A
from glowing.runtime.files import MAX_LENGTH_FILE

log = logging.getLogger(__name__)
TASKS = {A.CLASSIFIER: "text-classification", A.GENERATOR: "text-generation-with-past"}
# Which trained generator becomes onnx/generator: the fine-tuned one, or the RL-tuned one (same format).
GENERATORS = {"finetuned": A.GENERATOR, "rl": A.RL}


class ExportError(RuntimeError):
    pass


def source_dir(artifacts: Path, kind: str, generator: str = "finetuned") -> Path:
    return artifacts / (GENERATORS[generator] if kind == A.GENERATOR else kind)


def check_sources(artifacts: Path, generator: str = "finetuned") -> None:
    """Both trained models must be there before anything is written."""
    for kind in TASKS:
        for name in ("config.json", "tokenizer.json"):
            path = source_dir(artifacts, kind, generator) / name
            if not path.is_file():
                how = "--stages rl" if generator == "rl" and kind == A.GENERATOR else ""
                raise ExportError(f"{path} is missing: train the models first with "
                                  f"`python -m training --out {artifacts}{' ' + how if how else ''}`")
    if not (artifacts / A.CLASSIFIER / MAX_LENGTH_FILE).is_file():
        raise ExportError(f"{artifacts / A.CLASSIFIER / MAX_LENGTH_FILE} is missing (the classifier's truncation "
                          f"length); rerun `python -m training --out {artifacts} --stages classifier --force`")


def export_model(artifacts: Path, kind: str, out_dir: Path, generator: str = "finetuned") -> Path:
    """``artifacts/kind`` (``artifacts/rl`` for ``generator="rl"``) -> ``out_dir/model.onnx`` (plus
    tokenizer and config files)."""
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in transformers
        main_export(str(source_dir(artifacts, kind, generator)), output=str(out_dir), task=TASKS[kind], device="cpu",
                    do_validation=False)
    path = out_dir / "model.onnx"
    if not path.is_file():
        raise ExportError(f"Optimum wrote no {path} for the {kind} (task {TASKS[kind]})")
    if kind == A.CLASSIFIER:
        shutil.copy2(artifacts / kind / MAX_LENGTH_FILE, out_dir / MAX_LENGTH_FILE)
    return path
