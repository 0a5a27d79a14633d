"""Routing: which experts each token chose, recorded, imported, summarised and replayed.

- `trace`: the routing-trace format (parquet) and its checks; `recording`: traces recorded during
  `generate()`; `llamacpp`: llama.cpp route traces imported; `stats`: reuse, skew, cross-layer structure;
- `reader`: one reader for every trace file (parquet or llama.cpp, plain or .xz); `tracestats`: the
  `trace-stats` command;
- `replay`: recorded routing fed back into the engine so every policy sees the same experts.
"""
