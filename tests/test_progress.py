"""glowing.progress: a bar on a terminal, a line every 5% elsewhere (CI logs, `make ... > log`)."""

import io

import pytest

from glowing.progress import Lines, is_terminal, progress


@pytest.fixture(autouse=True)
def progress_on(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tests/conftest.py turns progress off for the suite


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_writes_a_line_every_five_percent():
    log = io.StringIO()
    seen = [x for x in progress(range(1000), desc="lm", unit="step", stream=log)]
    assert seen == list(range(1000))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 20
    assert lines[0].startswith("lm: 50/1000 step (5%), ") and lines[-1].startswith("lm: 1000/1000 step (100%), ")


def test_updates_postfix_and_context_manager():
    log = io.StringIO()
    with progress(total=1000, desc="tokenizing", unit="tok", stream=log) as bar:
        for _ in range(143):
            bar.update(7)  # 1,001: past the total, as a tokenizer's last chunk may be
            bar.set_postfix(loss="1.234")
    lines = log.getvalue().splitlines()
    assert len(lines) == 20 and all(line.endswith("loss=1.234") for line in lines)
    assert lines[-1].startswith("tokenizing: 1001/1000 tok (100%)")


def test_without_a_total_one_line_at_the_end():
    log = io.StringIO()
    for _ in progress(iter(range(500)), desc="generating", stream=log):
        pass
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0]]
    assert log.getvalue().startswith("generating: 500 it, ")


def test_disabled_writes_nothing_and_still_iterates(monkeypatch):
    log = Terminal()
    assert list(progress(range(30), enabled=False, stream=log)) == list(range(30))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(progress(range(30), stream=log)) == list(range(30))
    plain = io.StringIO()
    assert list(progress(range(30), stream=plain)) == list(range(30))
    assert log.getvalue() == "" and plain.getvalue() == ""


def test_a_terminal_gets_a_bar():
    from tqdm import tqdm

    term = Terminal()
    bar = progress(range(100), desc="bar", stream=term)
    assert isinstance(bar, tqdm) and not isinstance(bar, Lines)
    list(bar)
    assert "\r" in term.getvalue()


def test_is_terminal():
    closed = io.StringIO()
    closed.close()
    assert is_terminal(Terminal()) and not is_terminal(io.StringIO()) and not is_terminal(closed)
    assert not is_terminal(object())


def test_tokenizing_stops_at_its_total(capsys):
    """pack_blocks tokenizes in chunks of reviews: the last chunk overshoots max_tokens, the bar does not."""
    from training.lm import pack_blocks

    class Words:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[1 + len(w) for w in t.split()] for t in texts]}

    blocks = pack_blocks(Words(), ["a few words here"] * 2000, block_size=8, max_tokens=100)
    assert blocks.shape[1] == 8 and blocks.numel() >= 100
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("tokenizing: 100/100 tok (100%)"), lines[-3:]
