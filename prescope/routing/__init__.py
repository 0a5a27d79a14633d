"""Routing: which experts each token chose, recorded, imported, summarised and replayed.

- `trace`: the routing-trace format (parquet) and its checks; `recording`: traces recorded during
  `generate()`; `llamacpp`: llama.cpp route traces imported; `stats`: reuse, skew, cross-layer structure;
- `replay`: recorded routing fed back into the engine so every policy sees the same experts.
"""
