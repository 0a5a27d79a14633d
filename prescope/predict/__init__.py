"""Prediction of later layers' experts: LLaPor, the baselines, their accuracy.

- `predictors`: the `Predictor` interface and the training-free baselines (gate lookahead, history,
  frequency, activation matrix, oracle);
- `llapor`: LLaPor, the learned layer-aware predictor, its training and checkpoints; `llaporconfig`: its
  configuration and the options of `prescope train-predictor` (no torch needed to read them);
- `accuracy`: recall and exact match by layer and lookahead distance;
- `graphs`: CUDA graphs that replay a predictor's per-layer forecast.
"""
