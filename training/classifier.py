"""Stage ``classifier``: a transformers sequence classifier trained on IMDB train and SST-2 train.

``classifier.init`` picks the starting point:
  * ``scratch``: a small GPT-2 shape (right padding, the score read at the final token, which is
    always the end-of-text token appended by the tokenizer);
  * ``lm``: the pretrained LM body, ULMFiT-style;
  * a hub id or local dir (``distilbert-base-uncased``, ``gpt2``) with its own tokenizer.
Every epoch sees each IMDB training review once and ``sst2_repeats`` passes over the SST-2
phrases (balanced by class), in length buckets. The epoch with the best mean accuracy on the two
hold-outs (10% of IMDB train, 800 SST-2 train sentences) is kept; SST-2 validation and IMDB test
are only evaluated on.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from glowing.progress import progress as show_progress
from glowing.text import LABELS, normalize
from training import device as dev
from training import distributed as dist
from training.config import SCRATCH, ClassifierConfig
from training.optim import TimeLimit, adamw, check_finite, warmup_cosine

log = logging.getLogger(__name__)
ID2LABEL = dict(enumerate(LABELS))
LABEL2ID = {v: k for k, v in ID2LABEL.items()}


@dataclass
class ClassifierResult:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    seconds: float = 0.0
    steps: int = 0  # done: fewer than planned when max_minutes cut the plan
    planned_steps: int = 0


def append_eos(tokenizer) -> None:
    """Make the tokenizer end every text with end-of-text, even after truncation: the GPT-2
    classifier reads its score at the last real token, so that token is always the same one."""
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    tokenizer._tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                      special_tokens=[(eos, eos_id)]),
    ])


def build_classifier(cfg: ClassifierConfig, tokenizer_dir: Path, lm_dir: Path):
    """(model, tokenizer) for ``cfg.init``; the tokenizer right-pads."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, GPT2Config,
                              GPT2ForSequenceClassification)

    labels = {"num_labels": 2, "id2label": ID2LABEL, "label2id": LABEL2ID}
    if cfg.init in (SCRATCH, "lm"):
        source = tokenizer_dir if cfg.init == SCRATCH else lm_dir
        tokenizer = AutoTokenizer.from_pretrained(source)
        if cfg.init == SCRATCH:
            config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.max_length, n_embd=cfg.n_embd,
                                n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                                embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, summary_first_dropout=cfg.dropout,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **labels)
            model = GPT2ForSequenceClassification(config)
        else:
            model = GPT2ForSequenceClassification.from_pretrained(lm_dir, **labels)
            if cfg.max_length > model.config.n_positions:
                raise ValueError(f"classifier.max_length={cfg.max_length} exceeds the LM's context "
                                 f"({model.config.n_positions}); lower it")
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            append_eos(tokenizer)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.init)
            if tokenizer.pad_token is None:  # gpt2
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForSequenceClassification.from_pretrained(cfg.init, **labels)
        except Exception as err:
            raise RuntimeError(f"could not load classifier.init={cfg.init!r} (a hub id needs network access; "
                               f"a local dir needs a model and tokenizer): {err}") from err
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return model, tokenizer


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer([normalize(t) for t in texts], truncation=True, max_length=max_length)["input_ids"]


def length_batches(lengths: list[int], batch_size: int) -> list[np.ndarray]:
    """Inference batches: texts sorted by length (little padding); the caller restores order."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def bucket_batches(lengths: np.ndarray, examples: np.ndarray, batch_sizes: list[int], buckets: list[int],
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Training batches for one epoch: ``examples`` (indices, repeats allowed) grouped by length
    bucket (``buckets`` are upper bounds in tokens, the last bucket is open; ``batch_sizes`` holds
    one batch size per bucket), shuffled within each bucket, sorted by length within runs of 50
    batches (so a batch holds texts of nearly one length), cut into batches, and the batches
    shuffled. A batch is padded to its longest text,
    which is at most its bucket's bound."""
    which = np.searchsorted(np.asarray(buckets), lengths[examples], side="left")
    batches = []
    for b in np.unique(which):
        batch_size, run = batch_sizes[b], batch_sizes[b] * 50
        members = rng.permutation(examples[which == b])
        for i in range(0, len(members), run):
            chunk = members[i : i + run]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def epoch_examples(n_imdb: int, sst2_labels: np.ndarray, repeats: float, balance: bool,
                   rng: np.random.Generator) -> np.ndarray:
    """One epoch's examples, as indices into IMDB rows followed by SST-2 rows: every IMDB review
    once, and ``repeats`` x len(SST-2) SST-2 phrases, drawn pass after pass without replacement
    (so 1.0 is each phrase once). With ``balance``, half of them negative, half positive."""
    sst2 = np.arange(len(sst2_labels))
    groups = [sst2[sst2_labels == c] for c in (0, 1)] if balance else [sst2]
    picks = []
    for group in groups:
        want = int(round(repeats * len(sst2) / len(groups)))
        if want == 0 or len(group) == 0:
            continue
        passes = [rng.permutation(group) for _ in range(-(-want // len(group)))]
        picks.append(np.concatenate(passes)[:want])
    return np.concatenate([np.arange(n_imdb)] + [n_imdb + x for x in picks]).astype(int)


def batch_cost(width: int, rows: int) -> float:
    """What a training step on ``rows`` texts padded to ``width`` tokens costs, in token-positions: the
    matrix products grow with rows x width, attention with rows x width^2 (its share at 400 tokens
    about as large as the rest, as a profile of the cpu preset's classifier shows)."""
    return rows * width * (1.0 + width / 400.0)


def collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):  # right padding
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return input_ids, mask


@torch.inference_mode()
def predict_proba(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
                  progress: str | None = None) -> np.ndarray:
    """P(positive) per text, in input order."""
    model.eval()
    ids = encode(tokenizer, texts, max_length)
    out = np.empty(len(texts), dtype=np.float64)
    batches = length_batches([len(x) for x in ids], batch_size)
    device = dev.of(model)
    for batch in show_progress(batches, desc=progress or "", unit="batch", enabled=progress is not None):
        input_ids, mask = collate([ids[i] for i in batch], tokenizer.pad_token_id)
        with dev.autocast(device):
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        out[batch] = torch.softmax(logits, dim=-1)[:, LABEL2ID["positive"]].cpu().numpy()
    return out


def accuracy(model, tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> float:
    p = predict_proba(model, tokenizer, texts, max_length)
    return float(np.mean((p >= 0.5) == (np.asarray(labels) == 1)))


def train_classifier(model, tokenizer, cfg: ClassifierConfig, train_texts: list[str], train_labels: np.ndarray,
                     val: dict[str, tuple[list[str], np.ndarray]], seed: int,
                     sst2_texts: list[str] = (), sst2_labels: np.ndarray | None = None) -> ClassifierResult:
    """Train on IMDB (every review once per epoch) mixed with SST-2 phrases (``cfg.sst2_repeats``
    passes per epoch), in length buckets. ``val``: name -> (texts, labels) held out from training;
    the epoch with the best mean accuracy over them is kept. Under torchrun, each rank trains on
    its slice of every global batch (training/distributed.py)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    ids = encode(tokenizer, list(train_texts) + list(sst2_texts), cfg.max_length)
    lengths = np.array([len(x) for x in ids])
    labels = torch.as_tensor(np.concatenate([np.asarray(train_labels), np.asarray(
        sst2_labels if sst2_labels is not None else [], dtype=int)]), dtype=torch.long)
    sst2_y = np.asarray(sst2_labels if sst2_labels is not None else [], dtype=int)
    repeats = cfg.sst2_repeats if len(sst2_y) else 0.0
    sizes = cfg.bucket_batch_sizes or [cfg.batch_size] * (len(cfg.length_buckets) + 1)
    plan = [bucket_batches(lengths, epoch_examples(len(train_texts), sst2_y, repeats, cfg.sst2_balance, rng),
                           sizes, cfg.length_buckets, rng) for _ in range(cfg.epochs)]
    plan = [[b for b in epoch if len(b) >= dist.world_size()] for epoch in plan]  # every rank gets rows
    total = sum(len(epoch) for epoch in plan)
    log.info("classifier: %d IMDB reviews + %d SST-2 phrases per epoch (%d distinct), %d steps; buckets %s tokens, "
             "batches %s", len(train_texts), sum(len(b) for b in plan[0]) - len(train_texts), len(sst2_y), total,
             cfg.length_buckets, sizes)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    limit = TimeLimit([batch_cost(int(lengths[b].max()), len(b)) for epoch in plan for b in epoch],
                      cfg.max_minutes * 60, "classifier")
    schedule = warmup_cosine(optimizer, cfg.warmup_steps, limit.steps)
    device = dev.of(model)
    ddp = dist.wrap(model)
    result, best_state, step = ClassifierResult(), None, 0
    for epoch, batches in enumerate(plan, start=1):
        if step >= limit.total:
            break  # a time limit cut the plan before this epoch
        model.train()
        losses = []
        bar = show_progress(batches, desc=f"classifier epoch {epoch}/{cfg.epochs}", unit="batch",
                            enabled=dist.is_main())
        for batch in bar:
            if step >= limit.total:
                break
            local = dist.shard(batch)
            input_ids, mask = collate([ids[i] for i in local], tokenizer.pad_token_id)
            with dev.autocast(device):
                loss = ddp(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                           labels=labels[local].to(device)).loss
            dist.for_backward(loss, len(local), len(batch)).backward()  # DDP averages the ranks' gradients
            losses.append(check_finite(torch.tensor(dist.mean(float(loss.detach()), len(local))), "classifier", step))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if limit.step_done(step) < total:
                bar.total = max(0, limit.total - (step + 1 - len(losses)))  # the bar ends at 100% of the cut plan
            step += 1
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        bar.close()
        scores = {name: accuracy(model, tokenizer, texts, y, cfg.max_length) for name, (texts, y) in val.items()}
        score = float(np.mean(list(scores.values())))
        result.epochs.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": score,
                              **{f"{name}_accuracy": acc for name, acc in scores.items()}})
        log.info("classifier epoch %d: train loss %.4f, held-out accuracy %s (mean %.4f)", epoch, np.mean(losses),
                 ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), score)
        if score > result.best_val_accuracy or best_state is None:
            result.best_epoch, result.best_val_accuracy = epoch, score
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    result.steps, result.planned_steps = step, total
    return result
