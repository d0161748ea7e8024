"""The pieces every training loop here shares: optimizer, schedule, finite-loss guard, time limit."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import torch

from training import distributed as dist

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no decay on biases, LayerNorms and embeddings' 1-D parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int,
                  total: int | Callable[[], int]) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak rate, then cosine decay to 10% of it over ``total`` steps (a
    callable is asked at every step: a :class:`TimeLimit` may shorten the plan after its probe)."""
    steps = total if callable(total) else (lambda: total)

    def factor(step: int) -> float:
        end = steps()
        first = max(0, min(warmup, end - 1))
        if step < first:
            return (step + 1) / (first + 1)
        progress = (step - first) / max(1, end - first)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_finite(loss: torch.Tensor, stage: str, step: int) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(f"{stage}: loss became {value} at step {step}; lower {stage}.lr or check the data")
    return value


class TimeLimit:
    """A training loop's planned steps, cut once to what fits in ``max_seconds`` (0: no limit).

    ``costs`` holds one number per planned step in any unit (1 per step when steps are alike; rows x
    positions for batches of different shapes). The pace is measured over ``probe`` steps after the
    first (which warms up); then, once, the plan keeps the steps whose cost fits the time left at
    that pace, and the learning-rate schedule decays over the new total (``warmup_cosine(..., limit.steps)``).
    Under torchrun every rank takes rank 0's decision. The cpu preset's budget holds by construction on
    a slower machine this way (docs/TRAINING.md); on one fast enough, nothing is cut.

        limit = TimeLimit([1] * steps, cfg.max_minutes * 60, "lm")
        for step in range(steps):
            if step >= limit.total: break
            ...train one step...
            limit.step_done(step)
    """

    def __init__(self, costs: Sequence[float], max_seconds: float, stage: str, probe: int = 10,
                 clock: Callable[[], float] = time.perf_counter):
        self.costs, self.max_seconds, self.stage, self.clock = [float(c) for c in costs], float(max_seconds), stage, clock
        self.planned = self.total = len(self.costs)
        self.probe = max(1, probe)
        self.decided = self.max_seconds <= 0 or self.planned <= self.probe + 1
        self.started = clock()
        self.paced_from: float | None = None

    def steps(self) -> int:
        return self.total

    @property
    def cut(self) -> bool:
        return self.total < self.planned

    def step_done(self, step: int) -> int:
        """Call after step ``step`` (0-based) finished; returns the (possibly cut) total."""
        if step == 0:
            self.paced_from = self.clock()
        if self.decided or step < self.probe or self.paced_from is None:
            return self.total
        self.decided = True
        now = self.clock()
        pace = (now - self.paced_from) / max(1e-12, sum(self.costs[1 : step + 1]))  # seconds per unit of cost
        left, keep = self.max_seconds - (now - self.started), step + 1
        for cost in self.costs[step + 1 :]:
            left -= cost * pace
            if left < 0:
                break
            keep += 1
        keep = dist.broadcast_int(keep)
        if keep < self.planned:
            needed = (now - self.started) + sum(self.costs[step + 1 :]) * pace
            log.warning("%s: the %d planned steps would take %.1f min at this machine's pace, over its limit of "
                        "%.1f min (%s.max_minutes): training %d steps (%.0f%%) instead", self.stage, self.planned,
                        needed / 60, self.max_seconds / 60, self.stage, keep, 100 * keep / self.planned)
        self.total = keep
        return self.total
