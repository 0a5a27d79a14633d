"""Import llama.cpp route traces (`*.route.csv`, format `route_trace v1`) into a `Trace`.

The format (prescope/assets/data/README.md; two real traces ship there): a header of `#` lines, then a CSV.
  # route_trace v1
  # model=<path> arch=<arch> n_layer=<int> n_expert=<int> n_expert_used=<int>
  # layer=<i> expert_bytes=<int> dense_bytes=<int>        (one line per layer, i = 0..n_layer-1)
  turn,phase,step,layer,slot,expert,weight,residency,expert_bytes
One row per (token step, layer, routed slot): phase 0 = prefill, 1 = decode; step = global token index;
slot = rank (0 = highest weight); weight = renormalised router weight; residency and expert_bytes are the
recording engine's cache state (type-checked, otherwise ignored).

Mapping to a Trace: one prompt (0) per file, batch row 0; each turn is one generate() call (`call`); the
token's position is llama.cpp's step; within a turn the prefill tokens share step 0 (one forward call) and
each decode token gets the next step. Layers with expert_bytes > 0 are MoE layers. A (token, layer) that the
file does not list (llama.cpp skips the last layer for prefill tokens whose logits nobody reads) is stored as
MISSING; a listed one must have exactly the slots 0..K-1.

Reading streams the file in blocks of BLOCK_LINES lines, so memory stays near the size of the routing kept
([T, L, K] experts and weights), never the file's: each block is parsed by pandas' C parser and checked
with array operations, and its rows are written straight into those arrays. A block that fails any check
is read again line by line (`_slow_block`), which names the first bad line and what was expected, as soon
as the block is reached. `max_decode_steps` stops reading at the first row after that many decode steps
(llama.cpp writes each step's rows together). The stages, each its own function: the header
(`_read_header`: model fields, per-layer sizes), the rows (`_Rows`), the checks of whole (token, layer)
groups (`_check_groups`), the Trace (`_build`).

Letters: T tokens, L MoE layers, K top-k, E experts, n rows of one block.
"""

from __future__ import annotations

import csv
import io
import lzma
import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from prescope import data
from prescope.layout import ModelLayout
from prescope.routing.trace import MISSING, Trace

MAGIC = "# route_trace v1"
COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight", "residency", "expert_bytes")
MODEL_KEYS = ("model", "arch", "n_layer", "n_expert", "n_expert_used")
LAYER_KEYS = ("layer", "expert_bytes", "dense_bytes")
# Renormalised weights are printed with ~6 significant digits; allow that rounding above 1.
WEIGHT_TOLERANCE = 1e-5
BLOCK_LINES = 1 << 15  # rows parsed at once: a malformed line is named within one block of reaching it
UNFILLED = -2  # a slot no row has written yet (MISSING, -1, is what an absent (token, layer) becomes)
INITIAL_TOKENS = 256
CHECK_TOKENS = 4096  # tokens checked at once at the end
# Tokens the file can hold, from its size and its first rows' length, with this margin (prefill tokens
# skip a layer, so a file holds a few more tokens than rows / (L·K))
CAPACITY_SLACK = 1.05
WEIGHT_FIELD = COLUMNS.index("weight")
INTEGER_BYTES = np.frombuffer(b"0123456789-, \t\r\n", dtype=np.uint8)


class RouteCsvError(ValueError):
    """A malformed llama.cpp route trace; the message names the file, the line and what was expected."""


def _fields(path: Path, lineno: int, line: str, keys: tuple[str, ...]) -> dict[str, str]:
    body = line[1:].strip()
    found = dict(item.split("=", 1) for item in body.split() if "=" in item)
    missing = [k for k in keys if k not in found]
    if missing or len(body.split()) != len(found):
        raise RouteCsvError(f"{path}:{lineno}: header line {line!r} must hold {' '.join(k + '=…' for k in keys)}"
                            + (f"; missing {missing}" if missing else ""))
    return found


def _int(path: Path, lineno: int, what: str, text: str, lo: int = 0, hi: int | None = None) -> int:
    if not re.fullmatch(r"-?\d+", text.strip()):
        raise RouteCsvError(f"{path}:{lineno}: {what} must be an integer, got {text!r}")
    value = int(text)
    if value < lo or (hi is not None and value >= hi):
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise RouteCsvError(f"{path}:{lineno}: {what}={value} out of range, expected {bound}")
    return value


def _open(path: Path) -> BinaryIO:
    """The bytes of the file `path` names (`data.resolve`: itself, or its .xz copy, decompressed as read)."""
    found = data.resolve(path)
    return lzma.open(found, "rb") if found.suffix == data.XZ else open(found, "rb")


def _lines(path: Path, f) -> Iterator[tuple[int, str]]:
    """(line number, text without its newline) of a binary file, decoded line by line so that bytes that are
    not UTF-8 are named by their line."""
    for lineno, raw in enumerate(f, start=1):
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise RouteCsvError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_header(path: Path, lines: Iterator[tuple[int, str]]) -> tuple[dict, list[int]]:
    """(model fields, per-layer expert_bytes); `lines` is left at the first row after the column line."""
    def take() -> str | None:
        return next(lines, (None, None))[1]

    line = take()
    if line is None or line.strip() != MAGIC:
        got = line.strip() if line is not None else "an empty file"
        raise RouteCsvError(f"{path}:1: not a llama.cpp route trace: expected {MAGIC!r}, got {got!r}")
    line = take()
    if line is None or not line.startswith("#"):
        raise RouteCsvError(f"{path}:2: expected the model line '# model=… arch=… n_layer=… n_expert=… n_expert_used=…'")
    model = _fields(path, 2, line, MODEL_KEYS)
    for key in ("n_layer", "n_expert", "n_expert_used"):
        model[key] = _int(path, 2, key, model[key], lo=1)
    if model["n_expert_used"] > model["n_expert"]:
        raise RouteCsvError(f"{path}:2: n_expert_used={model['n_expert_used']} exceeds n_expert={model['n_expert']}")
    expert_bytes = []
    for i in range(model["n_layer"]):
        line, lineno = take(), 3 + i
        if line is None or not line.startswith("# layer="):
            raise RouteCsvError(f"{path}:{lineno}: expected '# layer={i} expert_bytes=… dense_bytes=…' "
                                f"(n_layer={model['n_layer']} layer lines)")
        f = _fields(path, lineno, line, LAYER_KEYS)
        if _int(path, lineno, "layer", f["layer"]) != i:
            raise RouteCsvError(f"{path}:{lineno}: layer lines must count 0..n_layer-1; expected layer={i}, got {f['layer']}")
        expert_bytes.append(_int(path, lineno, "expert_bytes", f["expert_bytes"]))
        _int(path, lineno, "dense_bytes", f["dense_bytes"])
    line = take()
    if line is None or tuple(c.strip() for c in line.split(",")) != COLUMNS:
        got = line.strip() if line is not None else "end of file"
        raise RouteCsvError(f"{path}:{3 + model['n_layer']}: expected the column line {','.join(COLUMNS)!r}, got {got!r}")
    return model, expert_bytes


class _Rows:
    """The routing read so far: tokens by (turn, step) in the order first seen, with their phase and first
    line, and experts/weights [T, L, K] (UNFILLED where no row wrote yet)."""

    def __init__(self, path: Path, n_layer: int, num_experts: int, top_k: int, moe: list[int],
                 max_decode_steps: int | None) -> None:
        self.path, self.n_layer, self.E, self.K = path, n_layer, num_experts, top_k
        self.ordinal = np.full(n_layer, -1, dtype=np.int64)  # decoder layer -> MoE ordinal, -1 if dense
        self.ordinal[moe] = np.arange(len(moe))
        self.limit = max_decode_steps
        self.tokens: dict[tuple[int, int], tuple[int, int, int]] = {}  # (turn, step) -> (t, phase, line)
        self.decode_steps = 0
        self.done = False  # the step limit is reached: nothing more is read
        self.experts = np.full((INITIAL_TOKENS, len(moe), top_k), UNFILLED, dtype=np.int64)
        self.weights = np.zeros((INITIAL_TOKENS, len(moe), top_k), dtype=np.float32)

    def _token(self, turn: int, step: int, phase: int, lineno: int) -> int | None:
        """The token index of (turn, step), registering a new one; None when the step limit stops reading."""
        known = self.tokens.get((turn, step))
        if known is not None:
            if known[1] != phase:
                raise RouteCsvError(f"{self.path}:{lineno}: step {step} has phase {phase} here but {known[1]} "
                                    f"on line {known[2]}")
            return known[0]
        if self.limit is not None and self.decode_steps >= self.limit:
            self.done = True
            return None
        t = len(self.tokens)
        if t == len(self.experts):
            self._grow(t + max(INITIAL_TOKENS, t // 2))
        self.tokens[(turn, step)] = (t, phase, lineno)
        self.decode_steps += phase == 1
        return t

    def read(self, lines: Iterator[tuple[int, str]], file_bytes: int) -> None:
        while not self.done:
            block = [(n, text) for n, text in _take(lines, BLOCK_LINES) if text]
            if not block:
                return
            if self.limit is None and len(self.tokens) == 0:  # room for the whole file at once: no regrowth
                row_bytes = sum(len(text) + 1 for _, text in block) / len(block)
                self._grow(int(CAPACITY_SLACK * file_bytes / row_bytes / (self.experts.shape[1] * self.K)) + 1)
            if not self._fast_block(block):
                self._slow_block(block)

    def _grow(self, capacity: int) -> None:
        """Room for `capacity` tokens: new arrays filled in place, so growing holds the old and the new, no more."""
        n = len(self.experts)
        if capacity <= n:
            return
        experts = np.full((capacity, *self.experts.shape[1:]), UNFILLED, dtype=np.int64)
        experts[:n] = self.experts
        weights = np.zeros((capacity, *self.weights.shape[1:]), dtype=np.float32)
        weights[:n] = self.weights
        self.experts, self.weights = experts, weights

    def _fast_block(self, block: list[tuple[int, str]]) -> bool:
        """Parse and check a block with array operations and store it; False (nothing stored) when anything
        is off, so the caller reads it line by line for the exact error."""
        text = "\n".join(line for _, line in block)
        if not _integers_plain(text):  # pandas reads "1e0", "+1" or "11." as integers; the format has none
            return False
        try:
            frame = pd.read_csv(io.StringIO(text), header=None, names=COLUMNS,
                                dtype={c: np.int64 for c in COLUMNS if c != "weight"} | {"weight": np.float64},
                                engine="c", skip_blank_lines=False, quoting=csv.QUOTE_NONE)
        except (ValueError, pd.errors.ParserError, OverflowError):
            return False
        if len(frame) != len(block):
            return False
        v = {c: frame[c].to_numpy() for c in COLUMNS}  # each [n]
        layer_ok = (v["layer"] >= 0) & (v["layer"] < self.n_layer)
        ok = ((v["turn"] >= 0) & (v["phase"] >= 0) & (v["phase"] <= 1) & (v["step"] >= 0) & layer_ok
              & (v["slot"] >= 0) & (v["slot"] < self.K) & (v["expert"] >= 0) & (v["expert"] < self.E)
              & (v["residency"] >= 0) & (v["expert_bytes"] >= 0) & np.isfinite(v["weight"])
              & (v["weight"] >= 0) & (v["weight"] <= 1 + WEIGHT_TOLERANCE))
        if not ok.all() or (self.ordinal[v["layer"]] < 0).any():
            return False
        pairs, first, inverse = np.unique(np.stack([v["turn"], v["step"]], 1), axis=0, return_index=True,
                                          return_inverse=True)
        inverse = inverse.reshape(-1)
        if (v["phase"] != v["phase"][first][inverse]).any():
            return False
        tokens = np.empty(len(pairs), dtype=np.int64)
        cut = len(block)
        for i in np.argsort(first):  # new tokens in the order the file lists them
            turn, step, phase = int(pairs[i][0]), int(pairs[i][1]), int(v["phase"][first[i]])
            known = self.tokens.get((turn, step))
            if known is not None and known[1] != phase:
                return False
            if known is None and self.limit is not None and self.decode_steps >= self.limit:
                self.done, cut = True, int(first[i])
                break
            tokens[i] = self._token(turn, step, phase, block[first[i]][0])
        keep = np.arange(len(block)) < cut
        rows = tokens[inverse[keep]], self.ordinal[v["layer"][keep]], v["slot"][keep]
        if (self.experts[rows] != UNFILLED).any() or len(np.unique(np.ravel_multi_index(rows, self.experts.shape))) != keep.sum():
            return False  # a slot written twice: the line-by-line pass names it (tokens registered stay valid)
        self.experts[rows] = v["expert"][keep]
        self.weights[rows] = v["weight"][keep]
        return True

    def _slow_block(self, block: list[tuple[int, str]]) -> None:
        """The block line by line: the first malformed line raises RouteCsvError saying what was expected."""
        path = self.path
        for lineno, text in block:
            try:
                row = next(csv.reader([text]))
            except csv.Error as exc:
                raise RouteCsvError(f"{path}:{lineno}: not a CSV row ({exc})") from None
            if len(row) != len(COLUMNS):
                raise RouteCsvError(f"{path}:{lineno}: {len(row)} fields, expected {len(COLUMNS)} ({','.join(COLUMNS)})")
            turn = _int(path, lineno, "turn", row[0])
            phase = _int(path, lineno, "phase", row[1], 0, 2)
            step = _int(path, lineno, "step", row[2])
            layer = _int(path, lineno, "layer", row[3], 0, self.n_layer)
            slot = _int(path, lineno, "slot", row[4], 0, self.K)
            expert = _int(path, lineno, "expert", row[5], 0, self.E)
            _int(path, lineno, "residency", row[7])
            _int(path, lineno, "expert_bytes", row[8])
            try:
                weight = float(row[6])
            except ValueError:
                raise RouteCsvError(f"{path}:{lineno}: weight must be a number, got {row[6]!r}") from None
            if not (math.isfinite(weight) and 0.0 <= weight <= 1.0 + WEIGHT_TOLERANCE):
                raise RouteCsvError(f"{path}:{lineno}: weight={weight} out of range, expected [0, 1]")
            if self.ordinal[layer] < 0:
                raise RouteCsvError(f"{path}:{lineno}: layer {layer} has expert_bytes=0 in the header (not a MoE layer)")
            t = self._token(turn, step, phase, lineno)
            if t is None:
                return
            cell = (t, self.ordinal[layer], slot)
            if self.experts[cell] != UNFILLED:
                raise RouteCsvError(f"{path}:{lineno}: slot {slot} repeated for step {step}, layer {layer}")
            self.experts[cell], self.weights[cell] = expert, weight


def _integers_plain(text: str) -> bool:
    """True when every byte outside the weight field is one an integer field may hold (digits, '-', blanks)."""
    b = np.frombuffer(text.encode(), dtype=np.uint8)
    other = np.flatnonzero(~np.isin(b, INTEGER_BYTES))  # [m] positions of '.', 'e', letters...
    if not len(other):
        return True
    commas, newlines = np.flatnonzero(b == ord(",")), np.flatnonzero(b == ord("\n"))
    line_start = np.searchsorted(newlines, other) - 1  # index of the newline before each, -1: first line
    before_line = np.where(line_start >= 0, np.searchsorted(commas, newlines[np.maximum(line_start, 0)]), 0)
    field = np.searchsorted(commas, other) - before_line
    return bool((field == WEIGHT_FIELD).all())


def _take(lines: Iterator[tuple[int, str]], n: int) -> list[tuple[int, str]]:
    out = []
    for item in lines:
        out.append(item)
        if len(out) == n:
            break
    return out


def _first_line(path: Path, groups: set[tuple[int, int, int]]) -> tuple[int, tuple[int, int, int]]:
    """(line, (turn, step, layer)) of the first row of any of these groups: read again only for an error."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            parts = next(csv.reader([raw.decode("utf-8", errors="replace")]), [])
            if len(parts) == len(COLUMNS) and all(re.fullmatch(r"\s*\d+\s*", p) for p in parts[:4]):
                key = (int(parts[0]), int(parts[2]), int(parts[3]))
                if key in groups:
                    return lineno, key
    return 0, min(groups)  # unreachable for groups read from this file


def _check_groups(path: Path, rows: _Rows, moe: list[int]) -> None:
    """Every listed (token, layer) has exactly the slots 0..K-1, distinct experts, weights falling with the
    slot; the first bad group in file order is named with its first line."""
    T, K = len(rows.tokens), rows.K
    experts, weights = rows.experts[:T], rows.weights[:T]
    count = np.empty(experts.shape[:2], dtype=np.int64)  # [T, L] slots listed
    repeats, rising = np.empty(count.shape, dtype=bool), np.empty(count.shape, dtype=bool)
    for lo in range(0, T, CHECK_TOKENS):  # in slices: the temporaries stay small beside the arrays kept
        part = slice(lo, lo + CHECK_TOKENS)
        count[part] = (experts[part] != UNFILLED).sum(-1)
        repeats[part] = (np.diff(np.sort(experts[part], axis=-1), axis=-1) == 0).any(-1)
        rising[part] = (np.diff(weights[part], axis=-1) > WEIGHT_TOLERANCE).any(-1)
    partial = (count > 0) & (count < K)
    repeats &= count == K
    rising &= count == K
    bad = partial | repeats | rising
    if not bad.any():
        return
    filled = experts != UNFILLED  # [T, L, K]
    pair_of = {t: key for key, (t, _, _) in rows.tokens.items()}
    groups = {(pair_of[t][0], pair_of[t][1], moe[o]): (t, o) for t, o in zip(*np.nonzero(bad), strict=True)}
    line, (turn, step, layer) = _first_line(path, set(groups))
    t, o = groups[(turn, step, layer)]
    where = f"{path}:{line}: step {step}, layer {layer}"
    if partial[t, o]:
        slots = sorted(np.flatnonzero(filled[t, o]).tolist())
        raise RouteCsvError(f"{where} has slots {slots}, expected 0..{K - 1} (n_expert_used={K}); missing slot(s) "
                            f"{sorted(set(range(K)) - set(slots))}")
    chosen = [(int(e), float(f"{w:.7g}")) for e, w in zip(experts[t, o], weights[t, o], strict=True)]
    if repeats[t, o]:
        raise RouteCsvError(f"{where} repeats an expert: {chosen}")
    raise RouteCsvError(f"{where}: weights must fall with the slot (0 = highest), got {[w for _, w in chosen]}")


def load_llamacpp_trace(path, domain: str = "", max_decode_steps: int | None = None) -> Trace:
    """Read and validate a llama.cpp route trace (plain or .xz); every malformed line gets a RouteCsvError
    with its number. `max_decode_steps`: stop at the first row after that many decode steps (what a short
    replay needs)."""
    path = Path(path)
    if not data.exists(path):
        raise FileNotFoundError(f"route trace {path} does not exist")
    if max_decode_steps is not None and max_decode_steps < 1:
        raise RouteCsvError(f"max_decode_steps must be >= 1 (or None for all), got {max_decode_steps}")
    with _open(path) as f:
        lines = _lines(path, f)
        model, expert_bytes = _read_header(path, lines)
        moe = [i for i, b in enumerate(expert_bytes) if b > 0]
        if not moe:
            raise RouteCsvError(f"{path}: no layer has expert_bytes > 0, so no MoE layer")
        rows = _Rows(path, model["n_layer"], model["n_expert"], model["n_expert_used"], moe, max_decode_steps)
        rows.read(lines, data.resolve(path).stat().st_size)
    if not rows.tokens:
        raise RouteCsvError(f"{path}: no routing rows after the header")
    _check_groups(path, rows, moe)
    return _build(path, model, expert_bytes, moe, rows, domain)


def _build(path: Path, model: dict, expert_bytes: list[int], moe: list[int], rows: _Rows, domain: str) -> Trace:
    keys = sorted(rows.tokens)  # (turn, step), execution order
    turns = sorted({t for t, _ in keys})
    call = {turn: i for i, turn in enumerate(turns)}
    records, last = [], (None, 0)  # last: (turn, phase) of the previous token
    decode_step = 0
    for turn, s in keys:
        _, phase, line = rows.tokens[(turn, s)]
        if last[0] == turn and phase < last[1]:
            raise RouteCsvError(f"{path}:{line}: turn {turn} has a prefill step after a decode step")
        decode_step = decode_step + 1 if phase == 1 and last[0] == turn else (1 if phase == 1 else 0)
        last = (turn, phase)
        records.append({"prompt": 0, "row": 0, "position": s, "step": decode_step, "call": call[turn],
                        "phase": "decode" if phase == 1 else "prefill", "domain": domain})
    order = np.array([rows.tokens[k][0] for k in keys], dtype=np.int64)
    T = len(keys)
    experts, weights = rows.experts[:T], rows.weights[:T]
    if not np.array_equal(order, np.arange(T)):  # tokens listed out of step order: put them in order
        experts, weights = experts[order], weights[order]
    experts[experts == UNFILLED] = MISSING  # a (token, layer) the file does not list (count 0: all unfilled)
    moe_bytes = [expert_bytes[i] for i in moe]
    layout = ModelLayout(
        model_class=f"llama.cpp:{model['arch']}", model_type=model["arch"], num_layers=model["n_layer"],
        moe_layers=tuple(moe), dense_layers=tuple(i for i in range(model["n_layer"]) if i not in moe),
        num_experts=model["n_expert"], top_k=model["n_expert_used"], hidden_size=0, intermediate_size=0,
        dtype="gguf", expert_bytes=Counter(moe_bytes).most_common(1)[0][0],
        layer_expert_bytes=tuple(moe_bytes) if len(set(moe_bytes)) > 1 else ())
    missing = int((experts[:, :, 0] == MISSING).sum())
    meta = {"source": "llama.cpp route_trace v1", "file": path.name, "model": model["model"],
            "expert_bytes_per_layer": moe_bytes, "missing_entries": missing}
    return Trace(layout, pd.DataFrame(records), experts, weights, meta=meta)
