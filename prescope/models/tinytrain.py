"""Training and evaluating prescope-tiny: its config, the loop, its learning-rate schedule, and held-out loss.

`train` runs AdamW with linear warm-up and a cosine decay on random windows of a token stream, bf16
autocast on CUDA and fp32 on the CPU, the load-balancing auxiliary loss on, with optional early stopping
on a validation split and a wall-clock budget that cuts the step count once, early. Under autocast the
experts run through a registered transformers experts backend (`AUTOCAST_EXPERTS`) that casts their
fp32 master weights per call. `heldout_loss`, `evaluate_domains` and `greedy_continuations` measure
a model on held-out text for its card. `TinyConfig` (shape, corpus split, hyper-parameters) lives here
too; the recipe that calls these (`prescope train-tiny`), the card and loading live in `tiny.py`.

Learning rate at step s of S (warm-up W, floor ratio r):
    lr(s) = lr·(s+1)/W                                         for s < W
    lr(s) = lr·(r + (1−r)·½·(1 + cos(π·(s−W)/max(1, S−W))))    otherwise

Letters: B batch rows, T tokens per window, W windows, V vocabulary, P prompt tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from prescope.config import check_types
from prescope.models import corpus
from prescope.models.corpus import EOS_ID, PAD_ID, encode_documents

if TYPE_CHECKING:  # torch loads where a model trains or runs, so `prescope train-tiny --help` starts fast
    import torch


class TinyConfigError(ValueError):
    """A prescope-tiny setting is out of range."""


@dataclass(frozen=True)
class TinyConfig:
    """Model shape, tokenizer, corpus split and training hyper-parameters of prescope-tiny (each field's
    meaning in TINY_FIELD_HELP, which `prescope train-tiny --help` shows)."""

    vocab_size: int = 8192
    hidden_size: int = 128
    intermediate_size: int = 32
    num_layers: int = 16
    num_heads: int = 4
    num_experts: int = 64
    top_k: int = 8
    max_position: int = 2048
    tie_embeddings: bool = True
    router_aux_loss_coef: float = 0.01
    heldout_fraction: float = 0.1
    doc_chars: int = 2000
    stdlib_bytes: int = 1_500_000
    seq_len: int = 256
    batch_size: int = 256
    steps: int = 900
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    time_budget_s: float = 0.0  # 0 = no limit; else the step count is cut to fit, measured early

    def __post_init__(self) -> None:
        check_types(self, TinyConfigError)
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_experts", "top_k", "max_position", "doc_chars", "stdlib_bytes", "seq_len",
                    "batch_size", "steps", "lr")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TinyConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise TinyConfigError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.top_k > self.num_experts:
            raise TinyConfigError(f"top_k {self.top_k} must be <= num_experts {self.num_experts}")
        if self.vocab_size > np.iinfo(np.uint16).max:
            raise TinyConfigError(f"vocab_size {self.vocab_size} must fit uint16 token ids (<= 65535)")
        if self.seq_len > self.max_position:
            raise TinyConfigError(f"seq_len {self.seq_len} must be <= max_position {self.max_position}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TinyConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "router_aux_loss_coef", "time_budget_s", "seed"):
            if getattr(self, name) < 0:
                raise TinyConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def corpus_spec(self, corpus_dir: Path) -> corpus.CorpusSpec:
        return corpus.CorpusSpec(corpus_dir, self.heldout_fraction, self.doc_chars, self.stdlib_bytes)

    def olmoe_config(self):
        from transformers import OlmoeConfig

        return OlmoeConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads, max_position_embeddings=self.max_position,
            num_experts=self.num_experts, num_experts_per_tok=self.top_k, norm_topk_prob=False,
            router_aux_loss_coef=self.router_aux_loss_coef, tie_word_embeddings=self.tie_embeddings,
            pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
        )



TINY_FIELD_HELP = {
    "vocab_size": "byte-level BPE vocabulary trained on the training split",
    "hidden_size": "H: model width",
    "intermediate_size": "I: each expert's width",
    "num_layers": "L: decoder layers, each a MoE layer",
    "num_heads": "attention heads (H must divide by it)",
    "num_experts": "E: routed experts per layer",
    "top_k": "K: experts each token is routed to",
    "max_position": "longest sequence the model accepts",
    "tie_embeddings": "share the input embedding with the output head (true/false)",
    "router_aux_loss_coef": "weight of the load-balancing auxiliary loss",
    "heldout_fraction": "share of each domain's documents held out for evaluation",
    "doc_chars": "characters per document when the corpus lines are grouped",
    "stdlib_bytes": "bytes of Python standard-library source in the stdlib domain",
    "seq_len": "tokens per training window",
    "batch_size": "windows per training step",
    "steps": "training steps (the cosine schedule's length)",
    "lr": "peak AdamW learning rate",
    "min_lr_ratio": "floor of the cosine schedule, as a share of lr",
    "warmup_steps": "steps of linear warm-up",
    "weight_decay": "AdamW weight decay (matrices only)",
    "grad_clip": "gradient-norm clip (0 = none)",
    "seed": "seed of the weights and of the windows drawn",
    "time_budget_s": "wall-clock budget in seconds that cuts the step count once, early (0 = none)",
}

# Name of the training-time experts backend registered below (never saved in a config).
AUTOCAST_EXPERTS = "prescope_autocast_grouped_mm"


# ---------------------------------------------------------------- the experts backend while training


def _autocast_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """grouped_mm experts with their 3D weights cast to the autocast dtype.

    torch's grouped_mm is not autocast-aware and runs bf16 only on CUDA; the model keeps fp32
    master weights, so under autocast the expert weights are cast (differentiably) per call.
    """
    import torch
    from transformers.integrations.moe import grouped_mm_experts_forward

    device_type = hidden_states.device.type
    if not torch.is_autocast_enabled(device_type):
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    view = _CastView(experts, torch.get_autocast_dtype(device_type))
    return grouped_mm_experts_forward(view, hidden_states.to(view.dtype), top_k_index, top_k_weights)


class _CastView:
    """Read-through view of an experts module whose floating 3D tensors come back cast to `dtype`."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        self._module, self.dtype = module, dtype

    def __getattr__(self, name: str):
        import torch

        value = getattr(self._module, name)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 3:
            return value.to(self.dtype)
        return value


def _register_autocast_experts() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(AUTOCAST_EXPERTS, _autocast_experts_forward)


# ---------------------------------------------------------------- training


def lr_at(step: int, total: int, config: TinyConfig) -> float:
    """Warm-up then cosine decay to min_lr_ratio·lr (formula in the module docstring)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> torch.Tensor:
    """Windows of seq_len tokens starting at uniform random offsets of the training stream."""
    import torch

    if stream.size <= seq_len:
        raise ValueError(f"training stream has {stream.size} tokens, need more than seq_len={seq_len}")
    starts = rng.integers(0, stream.size - seq_len, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len)[None, :]  # [B, T]
    return torch.from_numpy(stream[idx].astype(np.int64))


@dataclass(frozen=True)
class TrainResult:
    """What one training run did: steps, tokens, time, and the loss curve (CE without the aux loss)."""

    steps: int
    tokens: int
    wall_s: float
    step_s: float
    losses: tuple[float, ...]
    monitor: tuple[dict, ...] = ()
    steps_run: int = 0  # steps taken; `steps` is less when early stopping restored an earlier state
    schedule_steps: int = 0  # length of the learning-rate schedule (the step count to reproduce)


def train(model, stream: np.ndarray, config: TinyConfig, device: str = "cpu", progress: bool = True,
          log_every: int = 50, calibrate_steps: int = 10, monitor: Mapping[str, np.ndarray] | None = None,
          monitor_every: int = 100, monitor_tokens: int = 4096,
          experts_implementation: str = AUTOCAST_EXPERTS, keep_best: bool = False) -> TrainResult:
    """Train `model` in place on random windows of `stream` (token ids [T_train]).

    With `config.time_budget_s` > 0 the step count S is cut once, after `calibrate_steps` timed
    steps (past 3 warm-up steps): S = min(steps, done + (budget − elapsed) / mean step time), so the
    cosine schedule still ends at its floor; a hard stop at the budget guards against slow steps.
    `monitor` (domain → held-out ids) is evaluated every `monitor_every` steps on its first
    `monitor_tokens` tokens and logged; with `keep_best` the weights of the evaluation with the lowest
    mean monitor loss are restored at the end (early stopping), so `monitor` must then be a validation
    split carved from the training text, never the held-out split.
    `experts_implementation` is the transformers experts backend used while training ("eager" is
    the slow, always-available fallback); the model is set back to "grouped_mm" afterwards.
    """
    import torch

    use_autocast = device.startswith("cuda")
    _register_autocast_experts()
    model.set_experts_implementation(experts_implementation)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "norm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.95), fused=use_autocast)
    rng = np.random.default_rng(config.seed)
    total, losses, warm, curve = config.steps, [], 3, []
    best_loss, best_state, best_step = math.inf, None, 0
    start = time.perf_counter()
    calib_start = None
    bar = tqdm(total=total, disable=not progress, mininterval=5.0, desc="train-tiny")
    step = 0
    while step < total:
        if step == warm:
            calib_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, config)
        batch = sample_batch(stream, rng, config.batch_size, config.seq_len).to(device)  # [B, T]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            out = model(input_ids=batch, labels=batch, output_router_logits=config.router_aux_loss_coef > 0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
        ce = (out.loss - config.router_aux_loss_coef * aux.to(out.loss.device)).item()
        losses.append(ce)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{ce:.3f}", refresh=False)
        elapsed = time.perf_counter() - start
        if config.time_budget_s > 0 and step == warm + calibrate_steps:
            per_step = (time.perf_counter() - calib_start) / calibrate_steps
            total = min(total, step + int((config.time_budget_s - elapsed) / per_step))
            bar.total = total
            print(f"train-tiny: {per_step:.3f} s/step measured; running {total} steps", flush=True)
        if log_every and (step % log_every == 0 or step == total):
            print(f"train-tiny: step {step}/{total} loss {ce:.4f} lr {lr_at(step - 1, total, config):.2e} "
                  f"{elapsed:.0f}s", flush=True)
        if monitor and (step % monitor_every == 0 or step == total):
            model.eval()
            point = {d: round(heldout_loss(model, ids, config.seq_len, monitor_tokens)[0], 4) for d, ids in monitor.items()}
            model.train()
            curve.append({"step": step, **point})
            mean = float(np.mean(list(point.values())))
            if keep_best and mean < best_loss:
                best_loss, best_step = mean, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            print(f"train-tiny: step {step} validation {point}", flush=True)
        if config.time_budget_s > 0 and elapsed > config.time_budget_s:
            print(f"train-tiny: time budget {config.time_budget_s:.0f}s reached at step {step}", flush=True)
            break
    bar.close()
    wall = time.perf_counter() - start
    if best_state is not None and best_step != step:
        print(f"train-tiny: restoring step {best_step} (validation {best_loss:.4f})", flush=True)
        model.load_state_dict(best_state)
        step = best_step
    model.set_experts_implementation("grouped_mm")
    model.eval()
    return TrainResult(step, step * config.batch_size * config.seq_len, wall, wall / max(1, len(losses)),
                       tuple(losses), tuple(curve), len(losses), total)


# ---------------------------------------------------------------- evaluation


def heldout_loss(model, ids: np.ndarray, seq_len: int, max_tokens: int, batch_size: int = 32) -> tuple[float, int]:
    """Mean next-token CE (nats) over non-overlapping windows of seq_len tokens from the first
    max_tokens ids; returns (loss, tokens predicted)."""
    import torch

    with torch.no_grad():
        n_windows = min(ids.size, max_tokens) // seq_len
        if n_windows == 0:
            raise ValueError(f"need at least seq_len={seq_len} held-out tokens, got {min(ids.size, max_tokens)}")
        windows = torch.from_numpy(ids[: n_windows * seq_len].astype(np.int64)).view(n_windows, seq_len)  # [W, T]
        device = next(model.parameters()).device
        use_autocast = device.type == "cuda"
        total, count = 0.0, 0
        for chunk in windows.split(batch_size):
            chunk = chunk.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                logits = model(input_ids=chunk).logits  # [b, T, V]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += chunk[:, 1:].numel()
        return total / count, count


def evaluate_domains(model, tokenizer, heldout: Mapping[str, str | np.ndarray], seq_len: int = 256,
                     max_tokens: int = 65536, batch_size: int = 32) -> pd.DataFrame:
    """Held-out loss per domain: one row per domain with columns domain, tokens, loss (nats), ppl.

    `heldout` maps domain → text (tokenized here) or token ids.
    """
    model.eval()
    rows = []
    for domain, data in heldout.items():
        ids = encode_documents(tokenizer, [data]) if isinstance(data, str) else np.asarray(data)
        loss, count = heldout_loss(model, ids, seq_len, max_tokens, batch_size)
        rows.append({"domain": domain, "tokens": count, "loss": loss, "ppl": math.exp(loss)})
    return pd.DataFrame(rows, columns=["domain", "tokens", "loss", "ppl"])


def greedy_continuations(model, tokenizer, heldout: Mapping[str, np.ndarray], domains: Iterable[str],
                         prompt_tokens: int = 24, new_tokens: int = 40) -> list[dict]:
    """Greedy continuation of the first `prompt_tokens` held-out tokens of each named domain."""
    import torch

    with torch.no_grad():
        device = next(model.parameters()).device
        out = []
        for domain in domains:
            prompt = torch.from_numpy(heldout[domain][:prompt_tokens].astype(np.int64))[None].to(device)  # [1, P]
            gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=PAD_ID)
            out.append({"domain": domain, "prompt": tokenizer.decode(prompt[0]),
                        "continuation": tokenizer.decode(gen[0, prompt.size(1):])})
        return out
