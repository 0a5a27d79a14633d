"""Tests of prescope.models.tinytrain: the training loop learns on the CPU and leaves the model on the default
experts backend, and the learning-rate schedule follows its formula."""

from __future__ import annotations

import numpy as np
import pytest

from prescope.models import tiny, tinytrain

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_steps_reduce_loss_on_cpu():
    config = tiny.TinyConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_layers=2, num_heads=2,
                             num_experts=8, top_k=2, seq_len=32, batch_size=8, steps=20, lr=1e-2,
                             warmup_steps=3, max_position=64)
    stream = np.tile(np.arange(2, 50, dtype=np.uint16), 200)  # a learnable periodic sequence
    model = tiny.build_model(config)
    result = tinytrain.train(model, stream, config, progress=False, log_every=0)
    assert result.steps == 20 and result.tokens == 20 * 8 * 32
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 1.0
    assert model.config._experts_implementation == "grouped_mm"


def test_lr_schedule_formula():
    config = tiny.TinyConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert tinytrain.lr_at(0, 110, config) == pytest.approx(0.1)
    assert tinytrain.lr_at(10, 110, config) == pytest.approx(1.0)
    assert tinytrain.lr_at(60, 110, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert tinytrain.lr_at(110, 110, config) == pytest.approx(0.1)
