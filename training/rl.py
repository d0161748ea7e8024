"""Stage ``rl``: tune the fine-tuned generator with reinforcement learning, the classifier as reward.

GRPO (TRL's ``GRPOTrainer``) with a reward function: for each query (the opening of an IMDB
*train* review, 2-8 tokens) the policy samples ``rl.num_generations`` responses, the project
classifier scores ``query + response`` (see ``ClassifierReward`` for the shaping terms), and each
response's advantage is its reward minus the mean of its group, divided by the reward's standard
deviation over the batch (``rl.scale_rewards``; per-group scaling would blow up the tiny
differences within a group of responses that are all positive already). A KL penalty
(``rl.kl_coef``, TRL's ``beta``, per token) holds the policy near the fine-tuned generator, which
is also the reference model.

    python -m training --preset cpu --data-dir ../shared/data --stages rl,eval-rl --set threads=1
    # what it reached and how long it took, with the machine: docs/TRAINING.md, "RL tuning"

Why GRPO: in trl 1.16 it is the maintained online trainer that takes a plain Python reward
function (PPO moved to ``trl.experimental`` and needs a value model and a reward *model*);
with no value head to learn, it is also the cheapest on 2 CPU cores. RLOO would do as well.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PrinterCallback, TrainerCallback

from glowing.progress import progress
from glowing.text import generation_prompt
from training.classifier import LABEL2ID, collate, encode
from training.config import RLConfig

log = logging.getLogger(__name__)


def repeated_bigram_share(text: str) -> float:
    """Share of a text's word bigrams that repeat an earlier bigram of the same text (words as
    distinct-n counts them: whitespace-split, lower-cased); 0 for a text without repeats."""
    words = text.lower().split()
    grams = list(zip(words, words[1:]))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def batch_novelty(texts: list[str]) -> list[float]:
    """Per text, the share of its distinct word bigrams that no other text of the batch uses: 1 for
    a text that shares no phrase with the rest, 0 for one made only of phrases the others use too."""
    grams = [set(zip(w, w[1:])) for w in (t.lower().split() for t in texts)]
    counts = Counter(g for s in grams for g in s)
    return [sum(counts[g] == 1 for g in s) / len(s) if s else 0.0 for s in grams]


class ClassifierReward:
    """TRL reward function: the classifier's positive logit margin (log-odds) or P(positive)
    of the whole review, query and response together, minus ``repetition_penalty`` times the
    response's repeated-bigram share: without that term the policy learns to repeat the phrases
    the classifier likes most ("a great movie is a great movie"), which is reward hacking; plus
    ``novelty_bonus`` times the share of the response's bigrams that no other response of the batch
    uses, against the other collapse, every response converging on the same few phrases."""

    def __init__(self, model, tokenizer, max_length: int, kind: str, bos_token: str | None,
                 repetition_penalty: float = 0.0, novelty_bonus: float = 0.0):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.kind, self.bos, self.repetition_penalty = kind, bos_token or "", repetition_penalty
        self.novelty_bonus = novelty_bonus
        self.__name__ = f"classifier_{kind}"  # TRL names the logged metric after the function

    def texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        return [(p[len(self.bos):] if self.bos and p.startswith(self.bos) else p) + c
                for p, c in zip(prompts, completions)]

    @torch.inference_mode()
    def score(self, texts: list[str]) -> np.ndarray:
        ids = encode(self.tokenizer, texts, self.max_length)
        input_ids, mask = collate(ids, self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        pos = LABEL2ID["positive"]
        margin = logits[:, pos] - logits[:, 1 - pos]
        return (margin if self.kind == "logit" else torch.sigmoid(margin)).cpu().numpy()

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        scores = self.score(self.texts(prompts, completions))
        if self.repetition_penalty:
            scores = scores - self.repetition_penalty * np.array([repeated_bigram_share(c) for c in completions])
        if self.novelty_bonus:
            scores = scores + self.novelty_bonus * np.array(batch_novelty(completions))
        return scores.tolist()


@torch.inference_mode()
def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token | prefix) over the response tokens of each row (``response_mask`` = 1)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * response_mask[:, 1:]).sum(-1)


def kl_to_reference(policy, reference, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence Monte-Carlo estimate of KL(policy || reference) for responses sampled from
    the policy: sum over response tokens of log pi(token) - log ref(token). Its mean over many
    samples is the sequence-level KL (nats)."""
    return (sequence_logprobs(policy, input_ids, attention_mask, response_mask)
            - sequence_logprobs(reference, input_ids, attention_mask, response_mask))


@dataclass
class RLResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # one row per logged step: reward, kl, ...

    def curve(self, key: str) -> list[float]:
        return [row[key] for row in self.history if key in row]


def grpo_config(cfg: RLConfig, out: Path, seed: int, use_cpu: bool):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out), seed=seed, use_cpu=use_cpu, bf16=not use_cpu and torch.cuda.is_available(),
        max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.warmup_steps, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, beta=cfg.kl_coef,
        num_iterations=cfg.epochs_per_batch, loss_type="dapo", scale_rewards=cfg.scale_rewards,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, log_completions=False)


class StepProgress(TrainerCallback):
    """The trainer's steps through ``glowing.progress`` (a bar on a terminal, a line per 5% elsewhere),
    with the last logged reward and KL."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress(total=state.max_steps, desc="rl", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.bar.set_postfix(reward=f"{logs['reward']:.3f}", kl=f"{logs.get('kl') or 0:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def tune(policy, tokenizer, reward: ClassifierReward, queries: list[str], cfg: RLConfig, out: Path, seed: int,
         use_cpu: bool = True) -> RLResult:
    """GRPO over ``queries`` (plain review openings); trains ``policy`` in place."""
    from datasets import Dataset
    from trl import GRPOTrainer

    prompts = [generation_prompt(q, tokenizer.bos_token) for q in queries]
    dataset = Dataset.from_dict({"prompt": prompts})
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=grpo_config(cfg, out, seed, use_cpu),
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # a line per logged step: glowing.progress reports instead
    trainer.add_callback(StepProgress())
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    history = [{"step": row["step"], "reward": row.get("reward"), "reward_std": row.get("reward_std"),
                "kl": row.get("kl"), "completion_length": row.get("completions/mean_length"),
                "entropy": row.get("entropy")}
               for row in trainer.state.log_history if "reward" in row]
    return RLResult(steps=int(trainer.state.global_step), seconds=seconds, history=history)


def reward_curve_plot(history: list[dict], path: Path) -> None:
    from training.plots import _plt

    plt = _plt()
    steps = [r["step"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    reward = np.asarray([r["reward"] for r in history], dtype=float)
    ax1.plot(steps, reward, alpha=0.35, label="per step")
    if len(reward) >= 5:
        k = max(2, len(reward) // 10)
        ax1.plot(steps[k - 1:], np.convolve(reward, np.ones(k) / k, mode="valid"), label=f"mean of {k} steps")
    ax1.set(xlabel="step", ylabel="mean training reward", title="reward: classifier log-odds (or P) + shaping terms")
    ax1.legend(loc="lower right")
    kl = [r["kl"] for r in history if r.get("kl") is not None]
    ax2.plot(steps[: len(kl)], kl, color="tab:red")
    ax2.set(xlabel="step", ylabel="KL to the fine-tuned model (nats/token)", title="KL")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
