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
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from pathlib import Path

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


def _read_header(path: Path, lines: list[str]) -> tuple[dict, list[int], int]:
    """(model fields, per-layer expert_bytes, index of the CSV column line)."""
    if not lines or lines[0].strip() != MAGIC:
        got = lines[0].strip() if lines else "an empty file"
        raise RouteCsvError(f"{path}:1: not a llama.cpp route trace: expected {MAGIC!r}, got {got!r}")
    if len(lines) < 2 or not lines[1].startswith("#"):
        raise RouteCsvError(f"{path}:2: expected the model line '# model=… arch=… n_layer=… n_expert=… n_expert_used=…'")
    model = _fields(path, 2, lines[1], MODEL_KEYS)
    for key in ("n_layer", "n_expert", "n_expert_used"):
        model[key] = _int(path, 2, key, model[key], lo=1)
    if model["n_expert_used"] > model["n_expert"]:
        raise RouteCsvError(f"{path}:2: n_expert_used={model['n_expert_used']} exceeds n_expert={model['n_expert']}")
    expert_bytes = []
    for i in range(model["n_layer"]):
        lineno = 3 + i
        if lineno > len(lines) or not lines[lineno - 1].startswith("# layer="):
            raise RouteCsvError(f"{path}:{lineno}: expected '# layer={i} expert_bytes=… dense_bytes=…' "
                                f"(n_layer={model['n_layer']} layer lines)")
        f = _fields(path, lineno, lines[lineno - 1], LAYER_KEYS)
        if _int(path, lineno, "layer", f["layer"]) != i:
            raise RouteCsvError(f"{path}:{lineno}: layer lines must count 0..n_layer-1; expected layer={i}, got {f['layer']}")
        expert_bytes.append(_int(path, lineno, "expert_bytes", f["expert_bytes"]))
        _int(path, lineno, "dense_bytes", f["dense_bytes"])
    col_line = 2 + model["n_layer"]
    if col_line >= len(lines) or tuple(c.strip() for c in lines[col_line].split(",")) != COLUMNS:
        got = lines[col_line].strip() if col_line < len(lines) else "end of file"
        raise RouteCsvError(f"{path}:{col_line + 1}: expected the column line {','.join(COLUMNS)!r}, got {got!r}")
    return model, expert_bytes, col_line


def load_llamacpp_trace(path, domain: str = "") -> Trace:
    """Read and validate a llama.cpp route trace (plain or .xz); every malformed line gets a RouteCsvError
    with its number."""
    path = Path(path)
    if not data.exists(path):
        raise FileNotFoundError(f"route trace {path} does not exist")
    lines = data.read_text(path).splitlines()
    model, expert_bytes, col_line = _read_header(path, lines)
    n_layer, E, K = model["n_layer"], model["n_expert"], model["n_expert_used"]
    moe = [i for i, b in enumerate(expert_bytes) if b > 0]
    if not moe:
        raise RouteCsvError(f"{path}: no layer has expert_bytes > 0, so no MoE layer")
    ordinal = {layer: o for o, layer in enumerate(moe)}
    entries: dict[tuple[int, int, int], dict[int, tuple[int, float]]] = {}  # (turn, step, layer) -> slot -> ...
    first_line: dict[tuple[int, int, int], int] = {}
    phase_of: dict[tuple[int, int], tuple[int, int]] = {}  # (turn, step) -> (phase, line)
    for lineno, row in enumerate(csv.reader(lines[col_line + 1:]), start=col_line + 2):
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise RouteCsvError(f"{path}:{lineno}: {len(row)} fields, expected {len(COLUMNS)} ({','.join(COLUMNS)})")
        turn = _int(path, lineno, "turn", row[0])
        phase = _int(path, lineno, "phase", row[1], 0, 2)
        step = _int(path, lineno, "step", row[2])
        layer = _int(path, lineno, "layer", row[3], 0, n_layer)
        slot = _int(path, lineno, "slot", row[4], 0, K)
        expert = _int(path, lineno, "expert", row[5], 0, E)
        _int(path, lineno, "residency", row[7])
        _int(path, lineno, "expert_bytes", row[8])
        try:
            weight = float(row[6])
        except ValueError:
            raise RouteCsvError(f"{path}:{lineno}: weight must be a number, got {row[6]!r}") from None
        if not (math.isfinite(weight) and 0.0 <= weight <= 1.0 + WEIGHT_TOLERANCE):
            raise RouteCsvError(f"{path}:{lineno}: weight={weight} out of range, expected [0, 1]")
        if layer not in ordinal:
            raise RouteCsvError(f"{path}:{lineno}: layer {layer} has expert_bytes=0 in the header (not a MoE layer)")
        seen_phase = phase_of.setdefault((turn, step), (phase, lineno))
        if seen_phase[0] != phase:
            raise RouteCsvError(f"{path}:{lineno}: step {step} has phase {phase} here but {seen_phase[0]} on line {seen_phase[1]}")
        key = (turn, step, layer)
        slots = entries.setdefault(key, {})
        first_line.setdefault(key, lineno)
        if slot in slots:
            raise RouteCsvError(f"{path}:{lineno}: slot {slot} repeated for step {step}, layer {layer}")
        slots[slot] = (expert, weight)
    if not entries:
        raise RouteCsvError(f"{path}: no routing rows after the header")
    for key, slots in entries.items():
        if len(slots) != K:
            absent = sorted(set(range(K)) - set(slots))
            raise RouteCsvError(f"{path}:{first_line[key]}: step {key[1]}, layer {key[2]} has slots {sorted(slots)}, "
                                f"expected 0..{K - 1} (n_expert_used={K}); missing slot(s) {absent}")
        chosen = [slots[k] for k in range(K)]
        if len({e for e, _ in chosen}) != K:
            raise RouteCsvError(f"{path}:{first_line[key]}: step {key[1]}, layer {key[2]} repeats an expert: {chosen}")
        if any(w1 > w0 + WEIGHT_TOLERANCE for (_, w0), (_, w1) in zip(chosen, chosen[1:], strict=False)):
            raise RouteCsvError(f"{path}:{first_line[key]}: step {key[1]}, layer {key[2]}: weights must fall with "
                                f"the slot (0 = highest), got {[w for _, w in chosen]}")
    return _build(path, model, expert_bytes, moe, ordinal, entries, phase_of, domain)


def _build(path: Path, model: dict, expert_bytes: list[int], moe: list[int], ordinal: dict[int, int],
           entries: dict, phase_of: dict, domain: str) -> Trace:
    keys = sorted(phase_of)  # (turn, step), execution order
    turns = sorted({t for t, _ in keys})
    rows, index = [], {}
    for turn in turns:
        in_turn = [(s, phase_of[(turn, s)]) for t, s in keys if t == turn]
        decode_step, last_phase = 0, 0
        for s, (phase, line) in in_turn:
            if phase < last_phase:
                raise RouteCsvError(f"{path}:{line}: turn {turn} has a prefill step after a decode step")
            last_phase = phase
            decode_step = decode_step + 1 if phase == 1 else 0
            index[(turn, s)] = len(rows)
            rows.append({"prompt": 0, "row": 0, "position": s, "step": decode_step, "call": turns.index(turn),
                         "phase": "decode" if phase == 1 else "prefill", "domain": domain})
    T, L, K = len(rows), len(moe), model["n_expert_used"]
    experts = np.full((T, L, K), MISSING, dtype=np.int64)
    weights = np.zeros((T, L, K), dtype=np.float32)
    for (turn, step, layer), slots in entries.items():
        t, o = index[(turn, step)], ordinal[layer]
        for slot, (e, w) in slots.items():
            experts[t, o, slot], weights[t, o, slot] = e, w
    moe_bytes = [expert_bytes[i] for i in moe]
    layout = ModelLayout(
        model_class=f"llama.cpp:{model['arch']}", model_type=model["arch"], num_layers=model["n_layer"],
        moe_layers=tuple(moe), dense_layers=tuple(i for i in range(model["n_layer"]) if i not in ordinal),
        num_experts=model["n_expert"], top_k=K, hidden_size=0, intermediate_size=0, dtype="gguf",
        expert_bytes=Counter(moe_bytes).most_common(1)[0][0])
    missing = int((experts[:, :, 0] == MISSING).sum())
    meta = {"source": "llama.cpp route_trace v1", "file": path.name, "model": model["model"],
            "expert_bytes_per_layer": moe_bytes, "missing_entries": missing}
    return Trace(layout, pd.DataFrame(rows), experts, weights, meta=meta)
