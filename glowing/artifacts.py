"""Where each stage puts its outputs inside an artifacts directory, and the manifest.

    artifacts/
      manifest.json      versions, config, data checksums, stage timings, metrics (stable keys)
      config.json        the resolved training config
      tokenizer/         byte-level BPE (transformers fast tokenizer)
      lm/                GPT-2 language model pretrained on IMDB train+unsup
      generator/         lm fine-tuned on positive reviews (tokenizer inside, left padding)
      rl/                generator tuned by reinforcement learning, classifier as reward (same format)
      classifier/        sequence classifier (tokenizer inside, right padding)
      baseline/          TF-IDF + logistic regression (reference row and independent judge)
      reports/           evaluation reports and plots
      onnx/              what ``python -m export`` writes
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer"
LM = "lm"
GENERATOR = "generator"
RL = "rl"
CLASSIFIER = "classifier"
BASELINE = "baseline"
REPORTS = "reports"
ONNX = "onnx"
BASELINE_FILE = "tfidf_logreg.joblib"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so that a crash mid-write never leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes it private; the service may run as another user
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it and rerun the pipeline") from err


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def update_manifest(root: str | Path, patch: dict[str, Any]) -> dict[str, Any]:
    """Merge ``patch`` into ``root/manifest.json`` (nested dicts merge, other values replace)."""
    manifest = deep_merge(read_manifest(root), patch)
    write_json_atomic(Path(root) / MANIFEST, manifest)
    return manifest


def get_path(data: dict[str, Any], dotted: str) -> Any:
    """``get_path(m, "metrics.classifier.imdb_test.accuracy")``; KeyError names the missing part."""
    node: Any = data
    for i, part in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{'.'.join(dotted.split('.')[: i + 1])} is missing")
        node = node[part]
    return node


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the manifest's metrics under their stable dotted keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out
