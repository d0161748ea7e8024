"""Stage ``classifier``: a transformers sequence classifier trained on IMDB train.

``classifier.init`` picks the starting point:
  * ``scratch``: a small GPT-2 shape (right padding, the score read at the final token, which is
    always the end-of-text token appended by the tokenizer);
  * ``lm``: the pretrained LM body, ULMFiT-style;
  * a hub id or local dir (``distilbert-base-uncased``, ``gpt2``) with its own tokenizer.
The epoch with the best accuracy on the held-out part of IMDB train is kept.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from glowing.text import LABELS, normalize
from training import device as dev
from training.config import SCRATCH, ClassifierConfig
from training.optim import adamw, check_finite, warmup_cosine

log = logging.getLogger(__name__)
ID2LABEL = dict(enumerate(LABELS))
LABEL2ID = {v: k for k, v in ID2LABEL.items()}


@dataclass
class ClassifierResult:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    seconds: float = 0.0


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


def length_batches(lengths: list[int], batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of similar length (little padding). Shuffled buckets when ``rng`` is given,
    else sorted (for inference, where the caller restores order)."""
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    bucket = batch_size * 50
    batches = []
    for i in range(0, len(order), bucket):
        chunk = order[i : i + bucket]
        chunk = chunk[np.argsort([lengths[j] for j in chunk], kind="stable")]
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


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
    batches = length_batches([len(x) for x in ids], batch_size, None)
    device = dev.of(model)
    for batch in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        input_ids, mask = collate([ids[i] for i in batch], tokenizer.pad_token_id)
        with dev.autocast(device):
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        out[batch] = torch.softmax(logits, dim=-1)[:, LABEL2ID["positive"]].cpu().numpy()
    return out


def train_classifier(model, tokenizer, cfg: ClassifierConfig, train_texts: list[str], train_labels: np.ndarray,
                     val_texts: list[str], val_labels: np.ndarray, seed: int) -> ClassifierResult:
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    ids = encode(tokenizer, train_texts, cfg.max_length)
    lengths = [len(x) for x in ids]
    steps_per_epoch = -(-len(ids) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    schedule = warmup_cosine(optimizer, cfg.warmup_steps, total)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    device = dev.of(model)
    result, best_state, step = ClassifierResult(), None, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        bar = tqdm(length_batches(lengths, cfg.batch_size, rng), desc=f"classifier epoch {epoch}/{cfg.epochs}",
                   unit="batch")
        for batch in bar:
            input_ids, mask = collate([ids[i] for i in batch], tokenizer.pad_token_id)
            with dev.autocast(device):
                loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             labels=labels[batch].to(device)).loss
            losses.append(check_finite(loss, "classifier", step))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        p_val = predict_proba(model, tokenizer, val_texts, cfg.max_length)
        val_acc = float(np.mean((p_val >= 0.5) == (np.asarray(val_labels) == 1)))
        result.epochs.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": val_acc})
        log.info("classifier epoch %d: train loss %.4f, validation accuracy %.4f", epoch, np.mean(losses), val_acc)
        if val_acc > result.best_val_accuracy or best_state is None:
            result.best_epoch, result.best_val_accuracy = epoch, val_acc
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result
