"""Where training runs: ``device = "auto"`` picks CUDA when torch sees a GPU, else the CPU.

On CUDA the forward passes run under bf16 autocast (weights and optimizer state stay fp32)."""

from __future__ import annotations

import contextlib

import torch


def resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but torch sees no CUDA device; use --set device=\"cpu\" or \"auto\"")
    return torch.device(name)


def of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
