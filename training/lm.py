"""Stages ``lm`` and ``generator``: a GPT-2 language model pretrained on IMDB train+unsup, then
fine-tuned on positive training reviews (the review generator).

Both stages are the same loop over packed blocks of tokens: every review is preceded by the
end-of-text token, reviews are concatenated and cut into ``block_size`` windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glowing.progress import progress
from glowing.text import normalize
from training import device as dev
from training import distributed as dist
from training.config import SCRATCH, LMConfig
from training.optim import TimeLimit, adamw, check_finite, warmup_cosine


@dataclass
class TrainResult:
    steps: int  # done: fewer than planned when max_minutes cut the plan
    planned_steps: int
    tokens: int
    first_loss: float | None  # None when steps = 0
    last_loss: float | None  # mean of the last 10% of steps
    seconds: float


def build_lm(cfg: LMConfig, tokenizer):
    """A GPT-2 LM from scratch sized by ``cfg``, or the pretrained model ``cfg.init``."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if cfg.init != SCRATCH:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.init)
        except Exception as err:
            raise RuntimeError(f"could not load lm.init={cfg.init!r} (a hub id needs network access; a local "
                               f"dir needs config.json and weights): {err}") from err
        model.config.pad_token_id = tokenizer.pad_token_id
        return model
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def pack_blocks(tokenizer, texts: list[str], block_size: int, max_tokens: int) -> torch.Tensor:
    """``[n_blocks, block_size]`` token ids: ``<eos> review <eos> review ...`` cut into windows.

    Tokenizes only as many reviews as needed to reach ``max_tokens`` (0 = all of them).
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    chunk, counted = 512, 0
    with progress(total=max_tokens or None, desc="tokenizing", unit="tok") as bar:
        for start in range(0, len(texts), chunk):
            batch = [normalize(t) for t in texts[start : start + chunk]]
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                stream.append(eos)
                stream.extend(ids)
            done = min(len(stream), max_tokens) if max_tokens else len(stream)
            bar.update(done - counted)  # the last chunk overshoots max_tokens: the bar stops at 100%
            counted = done
            if max_tokens and len(stream) >= max_tokens:
                break
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"only {len(stream)} tokens of text: not one block of {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def train_lm(model, blocks: torch.Tensor, *, steps: int, batch_size: int, lr: float, warmup: int,
             weight_decay: float, seed: int, stage: str, max_minutes: float = 0.0,
             device: torch.device | None = None) -> TrainResult:
    """Causal-LM training over ``blocks`` for ``steps`` steps (cycling through shuffled blocks), or
    as many of them as fit in ``max_minutes`` (0: all; see ``TimeLimit``).

    Under torchrun every rank draws the same global batch and trains on its slice of it."""
    import time

    device = device or dev.of(model)
    model.to(device).train()
    optimizer = adamw(model, lr, weight_decay)
    limit = TimeLimit([1] * steps, max_minutes * 60, stage)
    schedule = warmup_cosine(optimizer, warmup, limit.steps)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(blocks))
    cursor, losses = 0, []
    started = time.perf_counter()
    ddp = dist.wrap(model)
    bar = progress(range(steps), desc=stage, unit="step", enabled=dist.is_main())
    for step in bar:
        if step >= limit.total:
            break
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(blocks)), 0
        rows = order[cursor : cursor + min(batch_size, len(order))]
        local = dist.shard(rows)
        batch = blocks[torch.from_numpy(local)].to(device)
        cursor += batch_size
        with dev.autocast(device):
            loss = ddp(input_ids=batch, labels=batch).loss
        dist.for_backward(loss, len(local), len(rows)).backward()  # DDP averages the ranks' gradients here
        losses.append(check_finite(torch.tensor(dist.mean(float(loss.detach()), len(local))), stage, step))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
        if limit.step_done(step) < steps:
            bar.total = limit.total  # the bar ends at 100% of the cut plan
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    done = len(losses)
    return TrainResult(steps=done, planned_steps=steps, tokens=done * batch_size * blocks.shape[1],
                       first_loss=losses[0] if losses else None,
                       last_loss=float(np.mean(tail)) if losses else None,
                       seconds=time.perf_counter() - started)


@torch.inference_mode()
def mean_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Token-weighted mean cross-entropy of ``model`` on packed ``blocks``."""
    model.eval()
    total, count = 0.0, 0
    device = dev.of(model)
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        with dev.autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total, count = total + float(loss) * n, count + n
    return total / max(1, count)
