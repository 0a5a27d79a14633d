"""Tests of prescope.models.corpus: domains present, deterministic and disjoint splits, clear errors."""

from __future__ import annotations

import pytest

from prescope.data import read_text, shipped
from prescope.models import corpus

CORPUS_DIR = corpus.default_corpus_dir()  # the copy shipped in the package, xz-compressed


@pytest.fixture(scope="module")
def splits() -> dict[str, corpus.DomainSplit]:
    return corpus.load_splits(corpus.CorpusSpec(CORPUS_DIR))


def test_all_domains_present_with_train_and_heldout(splits):
    assert tuple(splits) == corpus.DOMAINS
    for split in splits.values():
        assert len(split.train) >= 9 * len(split.heldout) - 9
        assert split.heldout and all(doc.strip() for doc in split.heldout)
        assert len(split.train_text()) > 100_000


def test_split_is_deterministic():
    first = corpus.shared_documents(CORPUS_DIR, "wikipedia", 2000)
    again = corpus.shared_documents(CORPUS_DIR, "wikipedia", 2000)
    assert first == again
    assert corpus.split_documents(first, 0.1) == corpus.split_documents(again, 0.1)
    assert corpus.stdlib_documents(50_000) == corpus.stdlib_documents(50_000)


def test_heldout_disjoint_from_train(splits):
    window = corpus.DEDUP_WINDOW
    for domain, split in splits.items():
        assert not set(split.heldout) & set(split.train), domain
        train_lines = split.train_text().split("\n")
        train_windows = {tuple(train_lines[i : i + window]) for i in range(len(train_lines) - window + 1)}
        heldout_lines = split.heldout_text().split("\n")
        leaked = [i for i in range(len(heldout_lines) - window + 1)
                  if tuple(heldout_lines[i : i + window]) in train_windows]
        assert not leaked, f"{domain}: {len(leaked)} held-out windows also in train"


def test_heldout_is_last_documents():
    docs = [f"doc {i}" for i in range(20)]
    train, heldout = corpus.split_documents(docs, 0.1)
    assert heldout == ("doc 18", "doc 19") and train == tuple(docs[:18])


def test_dedup_drops_repeated_copy_keeps_first():
    lines = [f"line {i}" for i in range(30)]
    doubled = lines + lines[:20]  # the shared files look like this: A + A[:m]
    assert corpus.dedup_lines(doubled, window=4) == lines
    short_repeats = ["}", "", "}", "", "x", "}", ""]
    assert corpus.dedup_lines(short_repeats, window=4) == short_repeats


def test_group_documents_reaches_minimum_size():
    docs = corpus.group_documents(["a" * 9] * 10, doc_chars=25)
    assert all(len(doc) >= 25 for doc in docs[:-1])
    assert "\n".join(docs) == "\n".join(["a" * 9] * 10)


def test_stdlib_budget_and_order():
    docs = corpus.stdlib_documents(200_000)
    size = sum(len(doc.encode("utf-8")) for doc in docs)
    assert 150_000 < size <= 200_000
    assert len(docs) > 5


def test_missing_corpus_dir_is_a_clear_error(tmp_path):
    with pytest.raises(corpus.CorpusError, match="does not exist"):
        corpus.load_splits(corpus.CorpusSpec(tmp_path / "nowhere"))
    with pytest.raises(corpus.CorpusError, match="lacks arxiv.txt"):
        corpus.load_splits(corpus.CorpusSpec(tmp_path))
    for domain in corpus.SHARED_DOMAINS:
        (tmp_path / f"{domain}.txt").write_text("")
    with pytest.raises(corpus.CorpusError, match="empty"):
        corpus.check_corpus_dir(tmp_path)


def test_spec_validation():
    with pytest.raises(corpus.CorpusError, match="heldout_fraction"):
        corpus.CorpusSpec(CORPUS_DIR, heldout_fraction=0.0)
    with pytest.raises(corpus.CorpusError, match="doc_chars"):
        corpus.CorpusSpec(CORPUS_DIR, doc_chars=0)
    with pytest.raises(corpus.CorpusError, match="at least 2 documents"):
        corpus.split_documents(["only"], 0.1)


def test_default_corpus_dir_is_the_shipped_copy_wherever_the_cwd_is(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert corpus.default_corpus_dir() == shipped("corpus")
    assert all(shipped("corpus", f"{d}.txt.xz").is_file() for d in corpus.SHARED_DOMAINS)


def test_a_folder_of_plain_files_reads_like_the_shipped_copy(tmp_path):
    for domain in corpus.SHARED_DOMAINS:
        (tmp_path / f"{domain}.txt").write_text(read_text(CORPUS_DIR / f"{domain}.txt"))
    assert corpus.shared_documents(tmp_path, "c4", 2000) == corpus.shared_documents(CORPUS_DIR, "c4", 2000)
    corpus.check_corpus_dir(tmp_path)


def test_a_cards_spec_keeps_the_split_the_card_records(tmp_path):
    spec = corpus.card_spec({"heldout_fraction": 0.2, "doc_chars": 500, "vocab_size": 99})
    assert (spec.corpus_dir, spec.heldout_fraction, spec.doc_chars) == (corpus.default_corpus_dir(), 0.2, 500)
    assert spec.stdlib_bytes == corpus.CorpusSpec(tmp_path).stdlib_bytes  # not in the card: the default
    assert corpus.card_spec({}, tmp_path).corpus_dir == tmp_path
