"""Text conventions that training, export and the service must apply identically."""

from __future__ import annotations

import re

LABELS = ("negative", "positive")
POSITIVE = 1

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def normalize(text: str) -> str:
    """IMDB reviews carry HTML line breaks (``<br />``); models see newlines instead.

    Applied to every text a model reads, in training and at serving time, so that a review
    pasted with its ``<br />`` tags scores the same as the training data did.
    """
    return _BR.sub("\n", text)


def generation_prompt(prompt: str, bos_token: str | None) -> str:
    """Our language models saw every review right after a ``bos`` (end-of-text) token, so a
    prompt is the start of a new document: prefix it the same way (GPT-2 from the hub too)."""
    return f"{bos_token or ''}{normalize(prompt)}"
