"""Compiled segments on the H200: decode ms/step of the engine with and without `compile_segments`, the compile
wall time and the number of graphs dynamo compiled, for the OLMoE twin (16 layers) and the Qwen3-30B-A3B twin
(48 layers), batch 1 and 16, resident (budget 1.0, one CUDA graph per step) and on_demand_lru at 25 %
(piecewise graphs). Random weights, random prompts of 128 tokens, 16 generated (greedy), `timing="steps"`.

Run from the repository root:  OUT=/some/dir PYTHONPATH=$PWD python3 reports/h200/engine/compile/compile_probe.py
Writes $OUT/compile_probe.json (checksummed; rewritten after every cell, so a cut run keeps what finished) and
prints a table. DEADLINE_S (default 200) stops starting cells after that many seconds; DEV=cpu runs the same
cells on tiny twins of the same families (a smoke test of the script, not a timing).

Per cell: a warm-up generate of the measured length (its first decode step runs eagerly and compiles; the
rest replays the captured graphs), then the measured generate: decode ms/step is the median of its captured
steps (CUDA events around each forward). `compiles`/`compile_s` are the warm-up's: graphs dynamo compiled and
the wall time of the decode that compiled them (0 where an earlier cell of the same shapes already compiled
the code: dynamo's cache is the process's). `recompiles_after_warmup` must be 0. `tokens_equal_uncompiled`
compares the compiled cell's tokens with the uncompiled cell's (bf16: fused kernels may round differently).
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from prescope.config import EngineConfig
from prescope.engine.engine import Engine
from prescope.files import git_revision, write_json
from prescope.models.twins import build_twin, tiny_twin_config

OUT = Path(os.environ.get("OUT", "."))
DEV = os.environ.get("DEV", "cuda")
DEADLINE_S = float(os.environ.get("DEADLINE_S", 200))
INPUT_LEN, NEW_TOKENS = (128, 16) if DEV == "cuda" else (8, 4)
MODELS = tuple((name, int(layers)) for name, layers in  # MODELS="olmoe-1b-7b:16 qwen3-30b-a3b:48" (the default)
               (word.split(":") for word in os.environ.get("MODELS", "olmoe-1b-7b:16 qwen3-30b-a3b:48").split()))
CELLS = (("on_demand_lru", 1.0), ("on_demand_lru", 0.25))
BATCHES = (1, 16) if DEV == "cuda" else (1, 2)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def decode_ms(engine: Engine) -> tuple[float, int]:
    """Median decode step (ms) of the engine's last generate, its first (eager) decode step left out."""
    steps = engine.step_table()
    decode = steps[steps["phase"] == "decode"]["latency"].tolist()[1:]
    return 1e3 * statistics.median(decode), len(decode)


def cell(model, name: str, layers: int, policy: str, share: float, batch: int, compile_segments: bool) -> dict:
    config = EngineConfig(policy=policy, budget_share=share, device=DEV, timing="steps",
                          compile_segments=compile_segments)
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, model.config.vocab_size, (batch, INPUT_LEN), generator=gen).to(DEV)
    with Engine(model, config) as engine:
        began = time.perf_counter()
        engine.generate(ids, max_new_tokens=NEW_TOKENS)  # warm-up: compiles, captures
        sync()
        warm_s = time.perf_counter() - began
        compiled = engine.compiled.summary() if engine.compiled is not None else {"compiled_segments": False}
        compiles = compiled.get("compiles", 0)
        engine.reset()
        engine.clear_records()
        out = engine.generate(ids, max_new_tokens=NEW_TOKENS)
        sync()
        ms, steps = decode_ms(engine)
        after = engine.compiled.summary()["compiles"] if engine.compiled is not None else 0
    return {"model": name, "layers": layers, "policy": policy, "budget": share, "batch": batch,
            "compile_segments": compile_segments, **compiled, "mode": out.mode, "decode_ms_median": ms,
            "decode_steps": steps, "warmup_s": warm_s, "recompiles_after_warmup": after - compiles,
            "sequences": out.sequences.cpu()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    start, rows, skipped = time.perf_counter(), [], []
    meta = {"source": "measured", "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
            "torch": torch.__version__, "git_revision": git_revision(),
            "profile": EngineConfig().profile,
            "command": " ".join(["MODELS=" + shlex.quote(" ".join(f"{n}:{k}" for n, k in MODELS)),
                                 f"DEADLINE_S={DEADLINE_S:g}", "python3 reports/h200/engine/compile/compile_probe.py"]),
            "config": {"input_len": INPUT_LEN, "new_tokens": NEW_TOKENS, "batches": BATCHES, "cells": CELLS,
                       "models": MODELS, "timing": "steps", "dtype": "bfloat16", "weights": "random"}}
    for name, layers in MODELS:
        built, layers = time.perf_counter(), layers if DEV == "cuda" else 2
        cfg = name if DEV == "cuda" else tiny_twin_config(name, layers)
        model = build_twin(cfg, layers if DEV == "cuda" else None, device=DEV)
        print(f"{name}:{layers} built in {time.perf_counter() - built:.1f} s", flush=True)
        uncompiled = {}
        for policy, share in CELLS:  # each cell uncompiled, then compiled: a cut run keeps whole pairs
            for batch in BATCHES:
                for compile_segments in (False, True):
                    key = (policy, share, batch)
                    if time.perf_counter() - start > DEADLINE_S:
                        skipped.append(f"{name}|{policy}|{share}|b{batch}|compile={compile_segments}")
                        continue
                    try:
                        row = cell(model, name, layers, policy, share, batch, compile_segments)
                    except Exception as exc:  # noqa: BLE001 - one failed cell is reported, the others still run
                        row = {"model": name, "policy": policy, "budget": share, "batch": batch,
                               "compile_segments": compile_segments, "error": f"{type(exc).__name__}: {exc}"}
                        print(row, flush=True)
                        rows.append(row)
                        continue
                    seq = row.pop("sequences")
                    if compile_segments and key in uncompiled:
                        row["tokens_equal_uncompiled"] = bool(torch.equal(seq, uncompiled[key]))
                    elif not compile_segments:
                        uncompiled[key] = seq
                    rows.append(row)
                    print(f"{name:>14} {policy:>14} {share:4.2f} b={batch:<3d} compile={str(compile_segments):5} "
                          f"{row['mode']:>9} {row['decode_ms_median']:8.2f} ms/step compiles={row.get('compiles', 0)} "
                          f"compile_s={row.get('compile_s', 0):.1f} warm={row['warmup_s']:.1f}s "
                          f"{row.get('compile_reason') or ''}", flush=True)
                    write_json(OUT / "compile_probe.json", {**meta, "rows": rows, "skipped": skipped,
                                                            "elapsed_s": time.perf_counter() - start})
        del model
        if DEV == "cuda":
            torch.cuda.empty_cache()
    write_json(OUT / "compile_probe.json", {**meta, "rows": rows, "skipped": skipped,
                                            "elapsed_s": time.perf_counter() - start})
    print(f"\n{'model':>14} {'policy':>14} {'budget':>6} {'batch':>5} {'off ms':>8} {'on ms':>8} {'speedup':>7} "
          f"{'compiles':>8} {'compile_s':>9}")
    for r in rows:
        if r.get("compile_segments") and "error" not in r:
            off = next((o for o in rows if not o.get("compile_segments") and "error" not in o and
                        (o["model"], o["policy"], o["budget"], o["batch"]) ==
                        (r["model"], r["policy"], r["budget"], r["batch"])), None)
            off_ms = off["decode_ms_median"] if off else float("nan")
            print(f"{r['model']:>14} {r['policy']:>14} {r['budget']:6.2f} {r['batch']:5d} {off_ms:8.2f} "
                  f"{r['decode_ms_median']:8.2f} {off_ms / r['decode_ms_median']:7.2f} {r.get('compiles', 0):8d} "
                  f"{r.get('compile_s', 0):9.1f}")
    print(f"elapsed {time.perf_counter() - start:.0f} s; skipped {skipped or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
