"""The files of a `prescope bench` run: bench.json (config, provenance and one row per measured cell),
routing.npz (each cell's decode routing) and timelines.parquet (the fully timed runs).

`write_bench` writes them, each atomically and checksummed (`prescope.files`); `read_bench` reads a
bench.json for everyone who uses one (fidelity, comparisons, reports), verified and checked for every key
they read, so a file cut or edited by hand is refused naming the cell and the key instead of failing later.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from prescope.files import read_json, write_json, write_npz, write_parquet

# What readers of a bench.json rely on (fidelity, comparisons, reports): key -> (type, what it is)
BENCH_CONFIG_KEYS = {"models": (list, "a list of model specs"), "input_len": (int, "an int"),
                     "profile": (str, "a profile name or path")}
BENCH_CELL_KEYS = {"model": (str, "a string"), "policy": (str, "a string"), "budget": ((int, float), "a number"),
                   "batch": (int, "an int"), "decode_ms_median": ((int, float), "a number"),
                   "decode_tok_s": ((int, float), "a number")}


def read_bench(path: str | Path) -> dict:
    """A bench.json, verified (`files.read_json`) and checked for every key its readers use, so a file edited
    or cut by hand is refused naming the cell and the key, not met later as a KeyError."""
    data = read_json(path, "bench JSON")

    def check(record: object, keys: dict, where: str) -> None:
        if not isinstance(record, dict):
            raise ValueError(f"{path}: {where} must be an object, got {record!r:.60}")
        for key, (kind, what) in keys.items():
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{path}: {where} needs {key!r} as {what}, got {value!r:.60}")

    check(data.get("config"), BENCH_CONFIG_KEYS, "config")
    if not isinstance(data.get("cells"), list):
        raise ValueError(f"{path}: `cells` must be a list of measured cells")
    for i, cell in enumerate(data["cells"]):
        check(cell, BENCH_CELL_KEYS, f"cell {i}")
    return data


def write_bench(out: Path, meta: dict, rows: list[dict], routes: dict, timelines: list[pd.DataFrame]) -> None:
    """bench.json (`meta` and the cells `rows`), routing.npz (each cell's decode routing) and, when any,
    timelines.parquet into `out`: each written atomically, with its checksum."""
    write_json(out / "bench.json", {**meta, "cells": rows})
    write_npz(out / "routing.npz", {k.replace("|", "__"): v for k, v in routes.items()})
    if timelines:
        write_parquet(out / "timelines.parquet", pd.concat(timelines, ignore_index=True))
