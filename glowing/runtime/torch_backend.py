"""PyTorch backend: the models ``python -m training`` saved, behind the same calls as ONNX.

It exists for comparison (parity, benchmarks) and as a fallback. fp32 on CPU or CUDA, fp16
on CUDA only; int8 is an ONNX format.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from glowing.runtime.files import TORCH_WEIGHTS, DeviceError, ModelFileError, require_file

log = logging.getLogger("glowing.runtime")


def _device(device: str, precision: str, threads: int | None) -> tuple[Any, Any]:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: choose from auto, cpu, cuda")
    if precision not in ("fp32", "fp16"):
        raise DeviceError(f"precision={precision!r} is not offered by the torch backend (fp32, or fp16 on "
                          "CUDA); int8 is the ONNX CPU format: use backend=onnx")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device=cuda, but torch sees no CUDA device (a CPU build of torch, or no GPU)")
    name = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    if precision == "fp16" and name == "cpu":
        raise DeviceError("precision=fp16 with the torch backend needs CUDA; use fp32 on CPU")
    if threads:
        torch.set_num_threads(threads)  # process-wide: torch has no per-model thread pool
    return torch.device(name), torch.float16 if precision == "fp16" else torch.float32


def _load(auto_class: str, model_dir: Path, device: str, precision: str, threads: int | None, fix: str):
    import transformers

    if not any((model_dir / w).is_file() for w in TORCH_WEIGHTS):
        raise ModelFileError(model_dir / TORCH_WEIGHTS[0], "the PyTorch weights are missing", fix)
    require_file(model_dir / "config.json", "the model config", fix)
    torch_device, dtype = _device(device, precision, threads)
    try:
        model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=dtype)
    except Exception as err:  # safetensors / torch raise various types for damaged weights
        raise ModelFileError(model_dir, f"transformers cannot load the model ({type(err).__name__}: {err})",
                             fix) from err
    model = model.to(torch_device).eval()
    providers = [f"torch:{torch_device}"]
    log.info("%s: torch providers %s (%s)", model_dir, providers, precision)
    return model, providers


class TorchClassifier:
    def __init__(self, model_dir: Path, device: str, precision: str, threads: int | None, fix: str):
        self.model, self.providers = _load("AutoModelForSequenceClassification", model_dir, device, precision,
                                           threads, fix)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        device = self.model.device
        with torch.inference_mode():
            logits = self.model(input_ids=torch.from_numpy(input_ids).to(device),
                                attention_mask=torch.from_numpy(attention_mask).to(device)).logits
        return logits.float().cpu().numpy()


class TorchCausalLM:
    """The transformers forward with its own KV cache (a ``DynamicCache``)."""

    def __init__(self, model_dir: Path, device: str, precision: str, threads: int | None, fix: str):
        self.model, self.providers = _load("AutoModelForCausalLM", model_dir, device, precision, threads, fix)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: Any) -> tuple[np.ndarray, Any]:
        import torch

        device = self.model.device
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(input_ids).to(device),
                             attention_mask=torch.from_numpy(attention_mask).to(device),
                             position_ids=torch.from_numpy(position_ids).to(device),
                             past_key_values=past, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float().cpu().numpy(), out.past_key_values

    def select(self, past: Any, rows: np.ndarray, start: int = 0) -> Any:
        import torch

        index = torch.from_numpy(rows).to(self.model.device)
        for layer in past.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        return past

    def concat(self, pasts: list[Any], pads: list[int]) -> Any:
        import torch
        import torch.nn.functional as F

        merged = pasts[0]
        for i, layer in enumerate(merged.layers):
            parts = [(p.layers[i].keys, p.layers[i].values, pad) for p, pad in zip(pasts, pads)]
            layer.keys = torch.cat([F.pad(k, (0, 0, pad, 0)) for k, _, pad in parts], dim=0)
            layer.values = torch.cat([F.pad(v, (0, 0, pad, 0)) for _, v, pad in parts], dim=0)
        return merged

