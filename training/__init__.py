"""Offline training pipeline: data -> tokenizer -> LM -> generator, classifier, baseline -> reports.

Run ``python -m training --help``. Writes ``artifacts/`` (see ``glowing.artifacts``).
"""
