"""Routing traces: which experts every token chose at every MoE layer, and their file format.

A `Trace` is the common currency of the simulator (replays it step by step), the predictors (train on its
hidden states), the cache studies and the routing statistics. It holds, for T tokens and L MoE layers:
the top-K experts per (token, layer), highest weight first, their gate weights, optionally the router
input hidden state and the full router logits, and a token table saying where each token sits (prompt,
batch row, position, forward call, phase). A (token, layer) entry that the source did not route (llama.cpp
skips the last layer for prefill tokens whose output nobody reads) holds `MISSING` experts and 0 weights.
Traces are recorded from a real generate() by `recording.record_trace`.

On-disk format (parquet, FORMAT_VERSION 1), one row per (token, MoE layer), token-major:
  token int64 (0..T-1), layer int16 (MoE ordinal 0..L-1), then every column of the token table
  (prompt, row, position, step, call, phase, domain, and any extra such as token_id), then
  experts fixed_size_list<int32>[K], weights fixed_size_list<float32>[K],
  hidden fixed_size_list<float16>[H] (optional), logits fixed_size_list<float32>[E] (optional).
The schema metadata key `prescope.trace` holds JSON {"format", "version", "num_tokens", "layout"
(ModelLayout.to_dict()), "meta"}; the key `prescope.checksum` holds the file's SHA-256 (`files.write_parquet`),
checked before anything is read, so a flipped bit or an edited header is refused. Files are written to a
temporary sibling and moved into place.

Letters: T tokens, L MoE layers, E experts, K top-k, H hidden.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prescope.files import verify, write_parquet
from prescope.layout import LayoutMismatchError, ModelLayout

MISSING = -1  # expert id of a (token, layer) entry the source did not route
FORMAT = "prescope.routing.trace"
FORMAT_VERSION = 1
METADATA_KEY = FORMAT.encode()
TOKEN_COLUMNS = ("prompt", "row", "position", "step", "call", "phase", "domain")
INT_COLUMNS = ("prompt", "row", "position", "step", "call")
PHASES = ("prefill", "decode")
# Tolerance for "weights are sorted highest first": float32 ties re-ordered by rounding.
SORT_TOLERANCE = 1e-6
CHECK_TOKENS = 4096  # tokens whose routing is checked at once (bounds the checks' temporary memory)
# Names that moved to prescope.routing.recording and are still imported from here; see `__getattr__`.
MOVED_TO_RECORDING = ("record_trace", "heldout_prompts")


class TraceError(ValueError):
    """A trace, or a trace file, is malformed; the message names what is wrong and what was expected."""


def _check_array(name: str, arr, shape: tuple[int, ...], kind: str, dtype) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in kind:
        raise TraceError(f"trace {name} must have a {'integer' if kind == 'iu' else 'float'} dtype, got {arr.dtype}")
    if arr.shape != shape:
        raise TraceError(f"trace {name} has shape {arr.shape}, expected {shape} (T, L, ...)")
    return arr.astype(dtype, copy=False)


def _check_finite(name: str, arr: np.ndarray, allow_inf: bool = False) -> np.ndarray:
    """Router inputs are finite numbers and logits no NaN (either would train or score a predictor on nothing)."""
    for lo in range(0, len(arr), CHECK_TOKENS):
        part = arr[lo:lo + CHECK_TOKENS]
        bad = np.isnan(part) if allow_inf else ~np.isfinite(part)
        if bad.any():
            t, layer, _ = np.argwhere(bad)[0]
            raise TraceError(f"trace token {lo + t} layer {layer}: {name} holds {part[t, layer][bad[t, layer]][0]}; "
                             "expected " + ("numbers" if allow_inf else "finite numbers"))
    return arr


@dataclass(frozen=True, eq=False)
class Step:
    """Tokens that went through one forward call: `index` selects them in the trace (execution order)."""

    call: int
    step: int
    phase: str
    index: np.ndarray  # [n] int64


@dataclass(frozen=True, eq=False)
class Trace:
    """Routing of T tokens over L MoE layers; see the module docstring for the fields' meaning."""

    layout: ModelLayout
    tokens: pd.DataFrame
    experts: np.ndarray  # [T, L, K] int64, highest weight first, MISSING where not routed
    weights: np.ndarray  # [T, L, K] float32
    hidden: np.ndarray | None = None  # [T, L, H] float16, router input
    logits: np.ndarray | None = None  # [T, L, E] float32
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        lay = self.layout
        if not isinstance(lay, ModelLayout):
            raise TraceError(f"trace layout must be a ModelLayout, got {type(lay).__name__}")
        if not isinstance(self.tokens, pd.DataFrame):
            raise TraceError(f"trace tokens must be a pandas DataFrame, got {type(self.tokens).__name__}")
        tokens = self.tokens.reset_index(drop=True).copy()
        if "call" not in tokens:
            tokens["call"] = 0  # one generate() call unless said otherwise
        missing = [c for c in TOKEN_COLUMNS if c not in tokens]
        if missing:
            raise TraceError(f"trace tokens lack columns {missing}; expected {list(TOKEN_COLUMNS)}")
        for col in INT_COLUMNS:
            if len(tokens) and not pd.api.types.is_integer_dtype(tokens[col]):
                raise TraceError(f"trace tokens column {col!r} must be integer, got {tokens[col].dtype}")
            tokens[col] = tokens[col].astype(np.int64)
        tokens["phase"] = tokens["phase"].astype(str)
        tokens["domain"] = tokens["domain"].astype(str)
        bad = sorted(set(tokens["phase"]) - set(PHASES))
        if bad:
            raise TraceError(f"trace tokens phase must be one of {PHASES}, got {bad}")
        if ((tokens["step"] == 0) != (tokens["phase"] == "prefill")).any():
            raise TraceError("trace tokens: step 0 must be exactly the prefill tokens")
        if tokens.duplicated(["prompt", "position"]).any():
            raise TraceError("trace tokens: (prompt, position) pairs must be unique")
        T, L, K = len(tokens), lay.num_moe_layers, lay.top_k
        experts = _check_array("experts", self.experts, (T, L, K), "iu", np.int64)
        weights = _check_array("weights", self.weights, (T, L, K), "f", np.float32)
        _check_routing(experts, weights, lay.num_experts)
        hidden = self.hidden
        if hidden is not None:
            width = lay.hidden_size or np.shape(hidden)[-1]
            hidden = _check_finite("hidden", _check_array("hidden", hidden, (T, L, width), "f", np.float16))
        logits = self.logits
        if logits is not None:
            # a router may mask experts with -inf; NaN is never a score
            logits = _check_finite("logits", _check_array("logits", logits, (T, L, lay.num_experts), "f", np.float32),
                                   allow_inf=True)
        for name, value in (("tokens", tokens), ("experts", experts), ("weights", weights),
                            ("hidden", hidden), ("logits", logits), ("meta", dict(self.meta))):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        extra = "".join(f", {n}" for n in ("hidden", "logits") if getattr(self, n) is not None)
        lay = self.layout
        return (f"Trace({lay.model_class}, T={self.num_tokens}, L={lay.num_moe_layers}, E={lay.num_experts}, "
                f"K={lay.top_k}, prompts={self.tokens['prompt'].nunique()}{extra})")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def present(self) -> np.ndarray:
        """[T, L] bool: the (token, layer) entries that were routed."""
        return self.experts[:, :, 0] != MISSING

    def select(self, which) -> Trace:
        """The tokens picked by a boolean mask [T] or, for any other iterable, by prompt ids."""
        arr = np.asarray(list(which) if not isinstance(which, (np.ndarray, pd.Series)) else which)
        if arr.dtype == bool:
            if arr.shape != (self.num_tokens,):
                raise TraceError(f"select mask has shape {arr.shape}, expected ({self.num_tokens},)")
            mask = arr
        else:
            mask = self.tokens["prompt"].isin(arr.astype(np.int64)).to_numpy()
        index = np.flatnonzero(mask)
        return Trace(self.layout, self.tokens.iloc[index], self.experts[index], self.weights[index],
                     None if self.hidden is None else self.hidden[index],
                     None if self.logits is None else self.logits[index], self.meta)

    def decode_only(self) -> Trace:
        return self.select((self.tokens["phase"] == "decode").to_numpy())

    def split_by_prompt(self, frac: float, seed: int = 0) -> tuple[Trace, Trace]:
        """(first, rest): a random `frac` of the prompts (at least one each side) and the others."""
        prompts = np.unique(self.tokens["prompt"].to_numpy())
        if len(prompts) < 2:
            raise TraceError(f"cannot split by prompt: the trace holds {len(prompts)} prompt(s), need >= 2")
        if not 0.0 < frac < 1.0:
            raise TraceError(f"split fraction must be in (0, 1), got {frac}")
        n_first = min(max(1, round(frac * len(prompts))), len(prompts) - 1)
        first = np.random.default_rng(seed).permutation(prompts)[:n_first]
        mask = self.tokens["prompt"].isin(first).to_numpy()
        return self.select(mask), self.select(~mask)

    def steps(self) -> Iterator[Step]:
        """Forward calls in execution order (call, then step): the tokens each one routed together."""
        groups = self.tokens.groupby(["call", "step"], sort=True).indices
        for (call, step), index in groups.items():
            yield Step(int(call), int(step), "prefill" if step == 0 else "decode", np.sort(index))


def _check_routing(experts: np.ndarray, weights: np.ndarray, num_experts: int) -> None:
    """Every (token, layer): all routed or all MISSING, experts in [0, E) and distinct, weights finite, >= 0 and
    highest first. Checked CHECK_TOKENS tokens at a time, so a large trace needs little memory beyond itself."""
    for lo in range(0, len(experts), CHECK_TOKENS):
        _check_routing_part(experts[lo:lo + CHECK_TOKENS], weights[lo:lo + CHECK_TOKENS], num_experts, lo)


def _check_routing_part(experts: np.ndarray, weights: np.ndarray, num_experts: int, first: int) -> None:
    missing = experts == MISSING  # [T, L, K]
    partial = missing.any(-1) & ~missing.all(-1)
    if partial.any():
        t, layer = np.argwhere(partial)[0]
        raise TraceError(f"trace token {first + t} layer {layer}: experts must be all routed or all MISSING, "
                         f"got {experts[t, layer].tolist()}")
    out = ~missing & ((experts < 0) | (experts >= num_experts))
    if out.any():
        t, layer, k = np.argwhere(out)[0]
        raise TraceError(f"trace token {first + t} layer {layer}: expert {experts[t, layer, k]} outside [0, E={num_experts})")
    if experts.shape[-1] > 1:
        dup = (np.diff(np.sort(experts, axis=-1), axis=-1) == 0) & ~missing[..., 1:]
        if dup.any():
            t, layer, _ = np.argwhere(dup)[0]
            raise TraceError(f"trace token {first + t} layer {layer}: repeated expert in {experts[t, layer].tolist()}")
        unsorted = (np.diff(weights, axis=-1) > SORT_TOLERANCE) & ~missing[..., 1:]
        if unsorted.any():
            t, layer, _ = np.argwhere(unsorted)[0]
            raise TraceError(f"trace token {first + t} layer {layer}: weights {weights[t, layer].tolist()} not sorted highest first")
    if not np.isfinite(weights).all():
        raise TraceError("trace weights must be finite")
    negative = ~missing & (weights < 0)
    if negative.any():
        t, layer, k = np.argwhere(negative)[0]
        raise TraceError(f"trace token {first + t} layer {layer}: weight {weights[t, layer, k]} is negative; router "
                         "weights are probabilities or scores >= 0")


def concat_traces(traces: Sequence[Trace]) -> Trace:
    """One trace from several recorded on the same layout; prompts and calls are renumbered to stay distinct."""
    if not traces:
        raise TraceError("concat_traces needs at least one trace")
    first = traces[0]
    for tr in traces[1:]:
        first.layout.check_compatible(tr.layout, "trace")
        if (tr.hidden is None) != (first.hidden is None) or (tr.logits is None) != (first.logits is None):
            raise TraceError("concat_traces: all traces must carry hidden states and logits alike")
    frames, prompt_base, call_base = [], 0, 0
    for tr in traces:
        tok = tr.tokens.copy()
        tok["prompt"] += prompt_base
        tok["call"] += call_base
        prompt_base, call_base = int(tok["prompt"].max()) + 1, int(tok["call"].max()) + 1
        frames.append(tok)
    arrays = {name: None if getattr(first, name) is None else np.concatenate([getattr(t, name) for t in traces])
              for name in ("experts", "weights", "hidden", "logits")}
    return Trace(first.layout, pd.concat(frames, ignore_index=True), **arrays,
                 meta={**first.meta, "concatenated": len(traces)})


def check_trace_matches(trace: Trace, model_or_layout) -> None:
    """Raise the adapter's LayoutMismatchError unless `trace` routes like the model (MoE layers, E, K, H)."""
    from prescope.models.adapter import describe  # torch: only when a model is at hand

    layout = model_or_layout if isinstance(model_or_layout, ModelLayout) else describe(model_or_layout)
    try:
        layout.check_compatible(trace.layout, "trace")
    except LayoutMismatchError as exc:
        raise LayoutMismatchError(f"trace was recorded on {_shape(trace.layout)}; model is {_shape(layout)} ({exc})") from None


def _shape(lay: ModelLayout) -> str:
    return f"{lay.model_class} with E={lay.num_experts}, K={lay.top_k}, L={lay.num_moe_layers}, H={lay.hidden_size}"


# ---------------------------------------------------------------------------------------------- parquet I/O

_ARRAY_COLUMNS = {"experts": pa.int32(), "weights": pa.float32(), "hidden": pa.float16(), "logits": pa.float32()}
_RESERVED = {"token", "layer", *_ARRAY_COLUMNS}


def _fixed_list(arr: np.ndarray, type_: pa.DataType) -> pa.FixedSizeListArray:
    values = pa.array(arr.reshape(-1).astype(type_.to_pandas_dtype(), copy=False), type=type_)
    return pa.FixedSizeListArray.from_arrays(values, arr.shape[-1])


def save_trace(trace: Trace, path) -> Path:
    """Write `trace` as parquet (format in the module docstring), atomically and checksummed."""
    path = Path(path)
    T, L = trace.num_tokens, trace.layout.num_moe_layers
    clash = _RESERVED.intersection(trace.tokens.columns)
    if clash:
        raise TraceError(f"trace tokens columns {sorted(clash)} clash with the file's own columns")
    columns = {"token": pa.array(np.repeat(np.arange(T, dtype=np.int64), L)),
               "layer": pa.array(np.tile(np.arange(L, dtype=np.int16), T))}
    for col in trace.tokens.columns:
        columns[col] = pa.array(np.repeat(trace.tokens[col].to_numpy(), L))
    for name, type_ in _ARRAY_COLUMNS.items():
        arr = getattr(trace, name)
        if arr is not None:
            columns[name] = _fixed_list(arr.reshape(T * L, arr.shape[-1]), type_)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "num_tokens": T,
              "layout": trace.layout.to_dict(), "meta": trace.meta}
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(header, default=str)})
    return write_parquet(path, table, compression="zstd")


def _read_header(path: Path) -> tuple[pq.ParquetFile, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    verify(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{path} is not a readable parquet file (corrupt or truncated?): {exc}") from None
    raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TraceError(f"{path} is a parquet file but not a prescope trace (no {FORMAT!r} schema metadata)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: corrupt {FORMAT!r} metadata: {exc}") from None
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise TraceError(f"{path}: unknown trace format {header.get('format')!r} version {header.get('version')!r}; "
                         f"this prescope reads {FORMAT!r} version {FORMAT_VERSION}")
    return pf, header


def load_trace(path) -> Trace:
    """Read a trace written by `save_trace`; clear errors for a missing, foreign, newer or corrupt file (a
    checksum that does not match: `files.ChecksumError`; a file without one loads, see `files`)."""
    path = Path(path)
    pf, header = _read_header(path)
    try:
        layout = ModelLayout.from_dict(header["layout"])
        T, L = int(header["num_tokens"]), layout.num_moe_layers
        table = pf.read()
        if table.num_rows != T * L:
            raise TraceError(f"{path}: {table.num_rows} rows, expected T*L = {T}*{L}")
        order = np.lexsort((table["layer"].to_numpy(), table["token"].to_numpy()))
        table = table.take(order)
        if not (np.array_equal(table["token"].to_numpy(), np.repeat(np.arange(T), L))
                and np.array_equal(table["layer"].to_numpy(), np.tile(np.arange(L), T))):
            raise TraceError(f"{path}: rows are not exactly one per (token 0..{T - 1}, layer 0..{L - 1})")
        first = table.take(np.arange(T) * L)
        token_cols = [c for c in table.column_names if c not in _RESERVED]
        tokens = first.select(token_cols).to_pandas()
        arrays = {}
        for name in _ARRAY_COLUMNS:
            if name in table.column_names:
                col = table[name].combine_chunks()
                if col.null_count:
                    raise TraceError(f"{path}: column {name!r} has nulls")
                arrays[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(T, L, col.type.list_size)
    except TraceError:
        raise
    except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
        raise TraceError(f"{path}: corrupt trace file: {type(exc).__name__}: {exc}") from None
    if "experts" not in arrays or "weights" not in arrays:
        raise TraceError(f"{path}: trace file lacks the experts or weights column")
    return Trace(layout, tokens, arrays["experts"], arrays["weights"], arrays.get("hidden"), arrays.get("logits"),
                 header.get("meta", {}))


def __getattr__(name: str):
    """`from prescope.routing.trace import record_trace` keeps working: recording imports this module, so this
    one can only re-export it lazily (PEP 562), on first use."""
    if name in MOVED_TO_RECORDING:
        return getattr(importlib.import_module("prescope.routing.recording"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
