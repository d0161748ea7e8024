"""Stage ``tokenizer``: a byte-level BPE trained on IMDB train+unsup, saved as a fast tokenizer.

With ``lm.init`` set to a pretrained model (``gpt2`` or a local dir), its own tokenizer is
saved instead, so that every later stage reads ``artifacts/tokenizer`` either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from glowing.progress import is_terminal
from glowing.text import normalize

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


# PTB tokenisation (SST-2: "it 's", "do n't", "the film , however") undone, so that SST-2 phrases
# and users' texts share tokens. Literal replacements: harmless on text that is not PTB-split.
PTB_JOINS = [(" n't", "n't"), (" 's", "'s"), (" 're", "'re"), (" 've", "'ve"), (" 'll", "'ll"), (" 'd", "'d"),
             (" 'm", "'m"), (" ,", ","), (" .", "."), (" !", "!"), (" ?", "?"), (" ;", ";"), (" :", ":"),
             ("-lrb- ", "("), (" -rrb-", ")"), ("( ", "("), (" )", ")")]


def normalizer(kind: str):
    """The tokenizer-level normalizer for ``classifier.normalizer`` (None for "none"). It is saved
    in tokenizer.json, so the exported model and the service apply it too."""
    from tokenizers import normalizers

    if kind == "none":
        return None
    steps = [normalizers.Lowercase()] + [normalizers.Replace(a, b) for a, b in PTB_JOINS] + [normalizers.Strip()]
    return normalizers.Sequence(steps)


def train_bpe(texts: list[str], vocab_size: int, min_frequency: int, normalize_kind: str = "none"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if normalize_kind != "none":
        tok.normalizer = normalizer(normalize_kind)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=is_terminal(),  # the Rust bar has no plain-line mode
    )
    tok.train_from_iterator((normalize(t) for t in texts), trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        # ORT generate() refuses token_type_ids, which PreTrainedTokenizerFast returns by default.
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=1_000_000,
    )


def load_pretrained_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:
        raise RuntimeError(f"could not load a tokenizer from {name_or_path!r} (a hub id needs network "
                           f"access; a local dir needs tokenizer files): {err}") from err
    if tok.pad_token is None:  # GPT-2 ships without one
        tok.pad_token = tok.eos_token
    return tok


def save(tokenizer, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)
    log.info("tokenizer: %d tokens -> %s", len(tokenizer), out_dir)
