"""Training text for prescope-tiny: five domains, deduplicated, with a deterministic held-out split.

Four domains come from the corpus that ships with prescope (`prescope/assets/data/corpus/*.txt.xz`:
arxiv, c4, github_oss_with_stack, wikipedia; samples from allenai/OLMoE's routing texts, see that folder's
README); a folder of the same plain `.txt` files works in its place. A fifth, `stdlib`, is text every
machine has: a fixed-budget sample of the Python standard library's source.

What the corpus files look like (read off the files, not assumed): they carry no document
separator; documents are joined by a single newline, so the newline is the only boundary that can
be recovered. Each file also repeats itself: its last 45-48% is a verbatim copy of its beginning
(file = A + A[:m]). A split by position would therefore leak held-out text into training. So each
domain is read as lines, every line that starts a window of `DEDUP_WINDOW` lines already seen
earlier is dropped (with the rest of that window), and the surviving lines are grouped greedily into
passages ("documents") of at least `doc_chars` characters. The held-out split is the last
`heldout_fraction` of those documents, in file order; training gets the rest.

The stdlib domain's documents are whole source files: the `.py` files under
`sysconfig.get_paths()["stdlib"]` (tests, site-packages and IDLE left out), sorted by path, taken at
evenly spaced ranks until `stdlib_bytes` is reached. It depends on the Python version that reads
it; the recipe records that version.

Tokenization lives here too, so data can be prepared on one machine and carried to another: a
byte-level BPE tokenizer trained on the training split (`build_tokenizer`), documents encoded
with an EOS after each (`encode_documents`), and `prepare` / `load_prepared` for the folder of
`.npy` token ids that training reads.
"""

from __future__ import annotations

import io
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prescope import data
from prescope.files import read_json, verify, write_json, write_with_sidecar

SHARED_DOMAINS: tuple[str, ...] = ("arxiv", "c4", "github_oss_with_stack", "wikipedia")
STDLIB_DOMAIN = "stdlib"
DOMAINS: tuple[str, ...] = (*SHARED_DOMAINS, STDLIB_DOMAIN)
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
EOS_ID, PAD_ID = 0, 1  # the BPE trainer numbers special tokens first, in this order

# Lines per window for duplicate detection: long enough that ordinary repeated lines ("}", "")
# never match, short enough to catch the copied halves of the files.
DEDUP_WINDOW = 8
# Standard-library folders left out of the stdlib domain: tests (huge, repetitive data files),
# third-party packages, and the IDLE GUI.
# Visit sorted stdlib files in this many interleaved passes so any budget samples the whole alphabet.
STDLIB_STRIDE = 8
STDLIB_EXCLUDED_DIRS: frozenset[str] = frozenset({"test", "tests", "site-packages", "idlelib", "__pycache__"})


class CorpusError(ValueError):
    """The corpus directory or a split setting is not usable."""


def default_corpus_dir() -> Path:
    """The corpus shipped with the package (`prescope/assets/data/corpus`)."""
    return data.shipped("corpus")


@dataclass(frozen=True)
class CorpusSpec:
    """Where the text comes from and how it is split. All choices that change the data live here."""

    corpus_dir: Path
    heldout_fraction: float = 0.1
    doc_chars: int = 2000
    stdlib_bytes: int = 1_500_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "corpus_dir", Path(self.corpus_dir))
        if not 0.0 < self.heldout_fraction < 0.5:
            raise CorpusError(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        if self.doc_chars < 1:
            raise CorpusError(f"doc_chars must be >= 1, got {self.doc_chars}")
        if self.stdlib_bytes < 1:
            raise CorpusError(f"stdlib_bytes must be >= 1, got {self.stdlib_bytes}")


@dataclass(frozen=True)
class DomainSplit:
    """One domain's documents, in file order, split into training and held-out parts."""

    domain: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    def train_text(self, sep: str = "\n") -> str:
        return sep.join(self.train)

    def heldout_text(self, sep: str = "\n") -> str:
        return sep.join(self.heldout)


def check_corpus_dir(corpus_dir: Path) -> None:
    """Raise CorpusError naming the path and the files expected when the corpus is missing or empty.
    Each domain file may be plain (`arxiv.txt`) or xz-compressed (`arxiv.txt.xz`)."""
    expected = ", ".join(f"{d}.txt" for d in SHARED_DOMAINS)
    if not corpus_dir.is_dir():
        raise CorpusError(f"corpus directory {corpus_dir} does not exist; expected a folder holding {expected}")
    missing = [d for d in SHARED_DOMAINS if not data.exists(corpus_dir / f"{d}.txt")]
    if missing:
        raise CorpusError(f"corpus directory {corpus_dir} lacks {', '.join(f'{d}.txt' for d in missing)}")
    empty = [d for d in SHARED_DOMAINS if data.is_empty(corpus_dir / f"{d}.txt")]
    if empty:
        raise CorpusError(f"corpus files are empty in {corpus_dir}: {', '.join(f'{d}.txt' for d in empty)}")


def dedup_lines(lines: list[str], window: int = DEDUP_WINDOW) -> list[str]:
    """Drop every line covered by a window of `window` consecutive lines that occurred earlier.

    A window starting at i is a repeat when tuple(lines[i:i+window]) was seen at some j < i; all
    of its lines are dropped. First occurrences are always kept, so the result is deterministic.
    """
    if window < 1:
        raise CorpusError(f"dedup window must be >= 1, got {window}")
    seen: set[tuple[str, ...]] = set()
    drop = [False] * len(lines)
    for i in range(len(lines) - window + 1):
        key = tuple(lines[i : i + window])
        if key in seen:
            for j in range(i, i + window):
                drop[j] = True
        else:
            seen.add(key)
    return [line for line, d in zip(lines, drop, strict=True) if not d]


def group_documents(lines: list[str], doc_chars: int) -> list[str]:
    """Greedily join consecutive lines with newlines into passages of at least `doc_chars` characters."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        current.append(line)
        size += len(line) + 1
        if size >= doc_chars:
            docs.append("\n".join(current))
            current, size = [], 0
    if current and any(line.strip() for line in current):
        docs.append("\n".join(current))
    return docs


def split_documents(docs: list[str], heldout_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Hold out the last documents: n_heldout = max(1, round(len(docs) * fraction))."""
    if len(docs) < 2:
        raise CorpusError(f"need at least 2 documents to split, got {len(docs)}")
    n_heldout = max(1, round(len(docs) * heldout_fraction))
    return tuple(docs[:-n_heldout]), tuple(docs[-n_heldout:])


def shared_documents(corpus_dir: Path, domain: str, doc_chars: int) -> list[str]:
    """One corpus domain (`corpus_dir`/DOMAIN.txt, or .txt.xz) as deduplicated passages, in file order."""
    if domain not in SHARED_DOMAINS:
        raise CorpusError(f"unknown shared domain {domain!r}; expected one of {SHARED_DOMAINS}")
    text = data.read_text(corpus_dir / f"{domain}.txt")
    return group_documents(dedup_lines(text.split("\n")), doc_chars)


def stdlib_files(stdlib_dir: Path | None = None) -> list[Path]:
    """All standard-library `.py` files outside STDLIB_EXCLUDED_DIRS, sorted by relative path."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(budget_bytes: int, stdlib_dir: Path | None = None) -> list[str]:
    """Whole stdlib files at evenly spaced sorted ranks, until `budget_bytes` of UTF-8 text.

    Files are visited in the order of ranks 0, s, 2s, ... then 1, 1+s, ... with stride s = STDLIB_STRIDE, so a
    small budget still spans the alphabet; the file that crosses the budget is cut at a line end.
    """
    files = stdlib_files(stdlib_dir)
    if not files:
        raise CorpusError(f"no Python standard-library sources found under {stdlib_dir or sysconfig.get_paths()['stdlib']}")
    order = [i for start in range(STDLIB_STRIDE) for i in range(start, len(files), STDLIB_STRIDE)]
    docs: list[tuple[int, str]] = []
    used = 0
    for rank in order:
        room = budget_bytes - used
        if room <= 0:
            break
        data = files[rank].read_text(encoding="utf-8", errors="replace").encode("utf-8")
        truncated = len(data) > room
        if truncated:
            data = data[:room].rsplit(b"\n", 1)[0]
        text = data.decode("utf-8", errors="ignore")
        if text.strip():
            docs.append((rank, text))
            used += len(data)
        if truncated:
            break
    return [text for _, text in sorted(docs)]


def load_splits(spec: CorpusSpec) -> dict[str, DomainSplit]:
    """Every domain's deterministic train/held-out split, keyed by domain name in DOMAINS order."""
    check_corpus_dir(spec.corpus_dir)
    splits: dict[str, DomainSplit] = {}
    for domain in DOMAINS:
        if domain == STDLIB_DOMAIN:
            docs = stdlib_documents(spec.stdlib_bytes)
        else:
            docs = shared_documents(spec.corpus_dir, domain, spec.doc_chars)
        train, heldout = split_documents(docs, spec.heldout_fraction)
        splits[domain] = DomainSplit(domain, train, heldout)
    return splits


def train_texts(spec: CorpusSpec) -> dict[str, str]:
    """Training text per domain (documents joined by newlines)."""
    return {d: s.train_text() for d, s in load_splits(spec).items()}


def heldout_texts(spec: CorpusSpec) -> dict[str, str]:
    """Held-out text per domain (documents joined by newlines)."""
    return {d: s.heldout_text() for d, s in load_splits(spec).items()}


def python_version() -> str:
    """The interpreter version whose standard library fed the stdlib domain."""
    return ".".join(str(v) for v in sys.version_info[:3])


def build_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a `PreTrainedTokenizerFast` (EOS id 0, PAD id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOS_TOKEN) != EOS_ID or tok.token_to_id(PAD_TOKEN) != PAD_ID:
        raise RuntimeError("BPE trainer did not number the special tokens first")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=None)


def encode_documents(tokenizer, docs: Iterable[str]) -> np.ndarray:
    """Token ids of the documents, each followed by EOS, as one uint16 stream."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.uint16)


def prepare(spec: CorpusSpec, vocab_size: int, out_dir: Path, settings: dict, tokenizer=None) -> dict:
    """Corpus → tokenizer → ids, written to `out_dir` (tokenizer files, train.npy = the domains'
    training ids concatenated in DOMAINS order, heldout_<domain>.npy, prepare.json). `settings` (the
    caller's config) is recorded in prepare.json, which is returned. With `tokenizer` given (the routing
    models reuse prescope-tiny's, so held-out prompt ids are shared) none is trained."""
    splits = load_splits(spec)
    if tokenizer is None:
        tokenizer = build_tokenizer((d for s in splits.values() for d in s.train), vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    train_parts, record = [], {"domains": {}, "python": python_version(), "config": settings}
    for domain, split in splits.items():
        train_ids, heldout_ids = encode_documents(tokenizer, split.train), encode_documents(tokenizer, split.heldout)
        train_parts.append(train_ids)
        _save_ids(out_dir / f"heldout_{domain}.npy", heldout_ids)
        record["domains"][domain] = {
            "train_docs": len(split.train), "heldout_docs": len(split.heldout),
            "train_chars": len(split.train_text()), "heldout_chars": len(split.heldout_text()),
            "train_tokens": int(train_ids.size), "heldout_tokens": int(heldout_ids.size),
        }
    _save_ids(out_dir / "train.npy", np.concatenate(train_parts))
    write_json(out_dir / "prepare.json", record, indent=2)
    return record


def _save_ids(path: Path, ids: np.ndarray) -> None:
    """Token ids as .npy, atomically, checksummed beside it (`files.write_with_sidecar`)."""
    buffer = io.BytesIO()
    np.save(buffer, ids)
    write_with_sidecar(path, buffer.getvalue())


def _load_ids(path: Path) -> np.ndarray:
    verify(path)
    return np.load(path)


def validation_split(stream: np.ndarray, record: dict, fraction: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Carve the last `fraction` of each domain's training ids off as a validation set.

    train.npy is the domains' training ids concatenated in prepare.json order; returns the rest of
    the stream (for training) and {domain: validation ids} (for early stopping).
    """
    if not 0.0 < fraction < 0.5:
        raise CorpusError(f"validation fraction must be in (0, 0.5), got {fraction}")
    parts, valid, start = [], {}, 0
    for domain, info in record["domains"].items():
        ids = stream[start : start + info["train_tokens"]]
        start += info["train_tokens"]
        cut = ids.size - int(ids.size * fraction)
        parts.append(ids[:cut])
        valid[domain] = ids[cut:]
    if start != stream.size:
        raise ValueError(f"train.npy holds {stream.size} ids but prepare.json lists {start}")
    return np.concatenate(parts), valid


def load_prepared(data_dir: Path):
    """(tokenizer, train ids [T_train], {domain: held-out ids}, prepare record) from a `prepare` folder."""
    from transformers import PreTrainedTokenizerFast

    if not (data_dir / "prepare.json").is_file():
        raise FileNotFoundError(f"{data_dir} is not a prepared folder (no prepare.json); run with --prepare-only first")
    record = read_json(data_dir / "prepare.json", "prepare record")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(data_dir)
    heldout = {d: _load_ids(data_dir / f"heldout_{d}.npy") for d in record["domains"]}
    return tokenizer, _load_ids(data_dir / "train.npy"), heldout, record


def card_spec(card_config: dict, corpus_dir: str | Path | None = None) -> CorpusSpec:
    """The corpus split a model was trained with, as its card's `config` records it (over `corpus_dir`, default
    the shipped corpus), so held-out prompts stay held out."""
    return CorpusSpec(Path(corpus_dir) if corpus_dir else default_corpus_dir(),
                      **{k: card_config[k] for k in ("heldout_fraction", "doc_chars", "stdlib_bytes") if k in card_config})
