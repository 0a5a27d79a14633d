"""prescope-tiny: the project's own small trained MoE language model, and its reproducible recipe.

Architecture: transformers' `OlmoeForCausalLM` with OLMoE-1B-7B's routing topology (L = 16 MoE
layers, E = 64 experts, K = 8 per token, no shared expert, unnormalised top-k weights) at a tiny
width (H = 128, I = 32, 4 heads, 8192-token byte-level BPE vocabulary, tied embeddings). Parameters:
V·H + L·(4·H² + E·3·H·I + E·H + 2·H + 2·H) + H ≈ 14.8M, ≈ 29.7 MB in bf16, under the repository's
32 MB budget; the experts hold 85% of it, as in the real model.

Recipe (`prescope train-tiny`): corpus (`prescope.corpus`, five domains, held-out split) →
BPE tokenizer trained on the training split → token ids (`.npy`) → AdamW with linear warm-up and a
cosine decay, bf16 autocast on CUDA and fp32 on the CPU, the load-balancing auxiliary loss on →
held-out loss per domain for the trained model and for its random-initialised twin (same config,
same seed) → `save_pretrained` in bf16 plus tokenizer, `model_card.json` and `README.md`.
The two halves can run on different machines: `--prepare-only` writes tokenizer and ids to a
folder, `--data FOLDER` trains from it.

Learning rate at step s of S (warm-up W, floor ratio r):
    lr(s) = lr·(s+1)/W                                         for s < W
    lr(s) = lr·(r + (1−r)·½·(1 + cos(π·(s−W)/max(1, S−W))))    otherwise
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from prescope import corpus

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
EOS_ID, PAD_ID = 0, 1  # the BPE trainer numbers special tokens first, in this order
TINY_DIR = Path(__file__).resolve().parent / "assets" / "prescope-tiny"
# Name of the training-time experts backend registered below (never saved in a config).
AUTOCAST_EXPERTS = "prescope_autocast_grouped_mm"
CARD_ROUTING_KEY = "routing_statistics"


class TinyConfigError(ValueError):
    """A prescope-tiny setting is out of range."""


@dataclass(frozen=True)
class TinyConfig:
    """Model shape, tokenizer, corpus split and training hyper-parameters of prescope-tiny."""

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


# ---------------------------------------------------------------- tokenizer and data


def build_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a `PreTrainedTokenizerFast` (EOS id 0, PAD id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOS_TOKEN) != EOS_ID or tok.token_to_id(PAD_TOKEN) != PAD_ID:
        raise RuntimeError("BPE trainer did not number the special tokens first")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=None)


def encode_documents(tokenizer, docs: Iterable[str]) -> np.ndarray:
    """Token ids of the documents, each followed by EOS, as one uint16 stream."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.uint16)


def prepare(config: TinyConfig, corpus_dir: Path, out_dir: Path) -> dict:
    """Corpus → tokenizer → ids, written to `out_dir` (tokenizer files, train.npy, heldout_<domain>.npy,
    prepare.json). Returns the prepare.json record."""
    splits = corpus.load_splits(config.corpus_spec(corpus_dir))
    tokenizer = build_tokenizer((d for s in splits.values() for d in s.train), config.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    train_parts, record = [], {"domains": {}, "python": corpus.python_version(), "config": dataclasses.asdict(config)}
    for domain, split in splits.items():
        train_ids, heldout_ids = encode_documents(tokenizer, split.train), encode_documents(tokenizer, split.heldout)
        train_parts.append(train_ids)
        np.save(out_dir / f"heldout_{domain}.npy", heldout_ids)
        record["domains"][domain] = {
            "train_docs": len(split.train), "heldout_docs": len(split.heldout),
            "train_chars": len(split.train_text()), "heldout_chars": len(split.heldout_text()),
            "train_tokens": int(train_ids.size), "heldout_tokens": int(heldout_ids.size),
        }
    np.save(out_dir / "train.npy", np.concatenate(train_parts))
    (out_dir / "prepare.json").write_text(json.dumps(record, indent=2))
    return record


def validation_split(stream: np.ndarray, record: dict, fraction: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Carve the last `fraction` of each domain's training ids off as a validation set.

    train.npy is the domains' training ids concatenated in prepare.json order; returns the rest of
    the stream (for training) and {domain: validation ids} (for early stopping).
    """
    if not 0.0 < fraction < 0.5:
        raise TinyConfigError(f"validation fraction must be in (0, 0.5), got {fraction}")
    parts, valid, start = [], {}, 0
    for domain, info in record["domains"].items():
        ids = stream[start : start + info["train_tokens"]]
        start += info["train_tokens"]
        cut = ids.size - int(ids.size * fraction)
        parts.append(ids[:cut])
        valid[domain] = ids[cut:]
    if start != stream.size:
        raise ValueError(f"train.npy holds {stream.size} ids but prepare.json lists {start}")
    return np.concatenate(parts), valid


def load_prepared(data_dir: Path):
    """(tokenizer, train ids [T_train], {domain: held-out ids}, prepare record) from a `prepare` folder."""
    from transformers import PreTrainedTokenizerFast

    if not (data_dir / "prepare.json").is_file():
        raise FileNotFoundError(f"{data_dir} is not a prepared folder (no prepare.json); run with --prepare-only first")
    record = json.loads((data_dir / "prepare.json").read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(data_dir)
    heldout = {d: np.load(data_dir / f"heldout_{d}.npy") for d in record["domains"]}
    return tokenizer, np.load(data_dir / "train.npy"), heldout, record


# ---------------------------------------------------------------- model and training


def _autocast_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """grouped_mm experts with their 3D weights cast to the autocast dtype.

    torch's grouped_mm is not autocast-aware and runs bf16 only on CUDA; the model keeps fp32
    master weights, so under autocast the expert weights are cast (differentiably) per call.
    """
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
        value = getattr(self._module, name)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 3:
            return value.to(self.dtype)
        return value


def _register_autocast_experts() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(AUTOCAST_EXPERTS, _autocast_experts_forward)


def build_model(config: TinyConfig, seed: int | None = None):
    """A randomly initialised `OlmoeForCausalLM` of this config (fp32, CPU); same seed, same weights."""
    from transformers import GenerationConfig, OlmoeForCausalLM

    torch.manual_seed(config.seed if seed is None else seed)
    model = OlmoeForCausalLM(config.olmoe_config())
    model.generation_config = GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


def lr_at(step: int, total: int, config: TinyConfig) -> float:
    """Warm-up then cosine decay to min_lr_ratio·lr (formula in the module docstring)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> torch.Tensor:
    """Windows of seq_len tokens starting at uniform random offsets of the training stream."""
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


@torch.no_grad()
def heldout_loss(model, ids: np.ndarray, seq_len: int, max_tokens: int, batch_size: int = 32) -> tuple[float, int]:
    """Mean next-token CE (nats) over non-overlapping windows of seq_len tokens from the first
    max_tokens ids; returns (loss, tokens predicted)."""
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


@torch.no_grad()
def greedy_continuations(model, tokenizer, heldout: Mapping[str, np.ndarray], domains: Iterable[str],
                         prompt_tokens: int = 24, new_tokens: int = 40) -> list[dict]:
    """Greedy continuation of the first `prompt_tokens` held-out tokens of each named domain."""
    device = next(model.parameters()).device
    out = []
    for domain in domains:
        prompt = torch.from_numpy(heldout[domain][:prompt_tokens].astype(np.int64))[None].to(device)  # [1, P]
        gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=PAD_ID)
        out.append({"domain": domain, "prompt": tokenizer.decode(prompt[0]),
                    "continuation": tokenizer.decode(gen[0, prompt.size(1):])})
    return out


# ---------------------------------------------------------------- saving and loading


def count_parameters(model) -> dict[str, int]:
    """Unique parameters in total and in the routed experts."""
    params = {id(p): p for p in model.parameters()}.values()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"total": sum(p.numel() for p in params), "experts": experts}


def save_tiny(model, tokenizer, out_dir: Path, card: dict) -> Path:
    """Write bf16 safetensors, config, generation config, tokenizer, model_card.json and README.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A bf16 copy on the CPU: casting the model itself would destroy its fp32 master weights.
    copy.deepcopy(model).to("cpu", torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_card(out_dir, card)
    return out_dir


def write_card(out_dir: Path, card: dict) -> None:
    """model_card.json and its rendering README.md; `bytes` is filled from the safetensors on disk."""
    weights = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    card = {**card, "bytes": weights, CARD_ROUTING_KEY: card.get(CARD_ROUTING_KEY)}
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "README.md").write_text(render_card(card))


def render_card(card: dict) -> str:
    """The README model card, rendered from the model_card.json record."""
    arch, train_rec = card["architecture"], card["training"]
    lines = [
        "# prescope-tiny", "",
        "The prescope project's own small Mixture-of-Experts language model: OLMoE-1B-7B's routing topology "
        f"({arch['num_layers']} MoE layers, {arch['num_experts']} experts, top-{arch['top_k']}) at a tiny width, "
        "trained on the shared corpus plus Python standard-library source so its routing is learned, not random. "
        "Loads with `transformers.AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.", "",
        "## Architecture", "",
        "| field | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in arch.items()],
        f"| parameters | {card['params']['total']:,} (experts {card['params']['experts']:,}) |",
        f"| weights on disk | {card['bytes']:,} bytes (bf16 safetensors) |", "",
        "## Training", "",
        "| field | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in train_rec.items()], "",
        "## Held-out loss per domain (nats per token)", "",
        *heldout_table(card["heldout"]),
        "", "The random twin has the same config and the same seed initialisation, untrained.", "",
        "## Greedy continuations of held-out prompts", "",
    ]
    for c in card["continuations"]:
        lines += [f"**{c['domain']}**", "", "```text", c["prompt"] + "⟦" + c["continuation"] + "⟧", "```", ""]
    lines += ["(prompt, then the model's greedy continuation inside ⟦ ⟧)", ""]
    if card.get("notes"):
        lines += ["## Notes", "", *[f"- {note}" for note in card["notes"]], ""]
    lines += ["## Routing statistics", "",
              "To be added by the project lead (key `routing_statistics` in `model_card.json`).", "",
              "## Reproduce", "", "```bash", card["command"], "```", "",
              "Corpus: allenai/OLMoE routing texts (Apache-2.0; arxiv, c4, github, wikipedia samples) from "
              "`../shared/data/corpus`, plus the Python standard library of the preparing interpreter "
              f"(Python {card['python']}).", ""]
    return "\n".join(lines)


def heldout_table(rows: list[dict]) -> list[str]:
    """Markdown rows of the held-out table; a `cpu_loss` column appears when the rows carry one."""
    cpu = bool(rows) and "cpu_loss" in rows[0]
    head = "| domain | tokens | trained | random twin |" + (" committed bf16 on CPU |" if cpu else "")
    rule = "|---|---|---|---|" + ("---|" if cpu else "")
    body = [f"| {r['domain']} | {r['tokens']} | {r['loss']:.3f} | {r['random_loss']:.3f} |"
            + (f" {r['cpu_loss']:.3f} |" if cpu else "") for r in rows]
    return [head, rule, *body]


def load_tiny(dir: Path | str | None = None, dtype: torch.dtype = torch.float32):  # noqa: A002 - contract name
    """(model, tokenizer) of the committed prescope-tiny (or the one in `dir`), eval mode, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(dir) if dir is not None else TINY_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no prescope-tiny model in {path} (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `prescope train-tiny`: one per TinyConfig field (--hidden-size ...), plus paths."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (model, or prepared data)")
    parser.add_argument("--corpus-dir", type=Path, default=None, help="shared corpus (default ../shared/data/corpus)")
    parser.add_argument("--data", type=Path, default=None, help="train from this --prepare-only folder")
    parser.add_argument("--prepare-only", action="store_true", help="write tokenizer and token ids, then stop")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per domain to evaluate")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    parser.add_argument("--valid-fraction", type=float, default=0.03,
                        help="share of each domain's training ids kept for validation / early stopping")
    parser.add_argument("--valid-every", type=int, default=25, help="steps between validation evaluations")
    parser.add_argument("--experts-implementation", default=AUTOCAST_EXPERTS,
                        help="experts backend while training (eager = slow fallback)")
    for field in dataclasses.fields(TinyConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=field.default)
        else:
            kind = {"int": int, "float": float}[str(field.type)]
            parser.add_argument(flag, type=kind, default=field.default, help=f"default {field.default}")


def config_from_args(args: argparse.Namespace) -> TinyConfig:
    return TinyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinyConfig)})


def run(args: argparse.Namespace) -> int:
    """The whole recipe: prepare (or load prepared data) → train → evaluate against the random twin → save."""
    config = config_from_args(args)
    if args.prepare_only:
        record = prepare(config, args.corpus_dir or corpus.default_corpus_dir(), args.out)
        tokens = sum(d["train_tokens"] for d in record["domains"].values())
        print(f"train-tiny: prepared {tokens} training tokens in {args.out}")
        return 0
    if args.data is None:
        args.data = args.out / "data"
        prepare(config, args.corpus_dir or corpus.default_corpus_dir(), args.data)
    tokenizer, stream, heldout, record = load_prepared(args.data)
    prepared = TinyConfig(**record["config"])
    if (prepared.vocab_size, prepared.heldout_fraction, prepared.doc_chars, prepared.stdlib_bytes) != (
            config.vocab_size, config.heldout_fraction, config.doc_chars, config.stdlib_bytes):
        raise TinyConfigError(f"prepared data in {args.data} was made with other tokenizer/corpus settings: {record['config']}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config)
    stream, valid = validation_split(stream, record, args.valid_fraction)
    result = train(model, stream, config, device=device, progress=not args.no_progress, monitor=valid,
                   experts_implementation=args.experts_implementation, keep_best=True,
                   monitor_tokens=args.eval_tokens, monitor_every=args.valid_every)
    empty = pd.DataFrame(columns=["domain", "tokens", "loss", "ppl", "random_loss"])
    # Saved before evaluation too, so a failure past this point still leaves the trained weights.
    save_tiny(model, tokenizer, args.out, make_card(model, config, result, empty, [], record, device, args.valid_every))
    trained = evaluate_domains(model, tokenizer, heldout, config.seq_len, args.eval_tokens)
    twin = build_model(config).to(device)
    random = evaluate_domains(twin, tokenizer, heldout, config.seq_len, args.eval_tokens)
    del twin
    table = trained.assign(random_loss=random["loss"].to_numpy())
    print(table.to_string(index=False))
    continuations = greedy_continuations(model, tokenizer, heldout, ("wikipedia", "stdlib", "c4"))
    for c in continuations:
        print(f"--- {c['domain']}: {c['prompt']!r} -> {c['continuation']!r}")
    card = make_card(model, config, result, table, continuations, record, device, args.valid_every)
    card["training"]["experts_backend"] = args.experts_implementation
    out = save_tiny(model, tokenizer, args.out, card)
    print(f"train-tiny: saved to {out}")
    return 0


def make_card(model, config: TinyConfig, result: TrainResult, table: pd.DataFrame, continuations: list[dict],
              record: dict, device: str, valid_every: int) -> dict:
    """The model_card.json record (README.md is rendered from it)."""
    hardware = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    defaults = TinyConfig()
    overrides = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                 if getattr(config, f.name) != getattr(defaults, f.name)}
    overrides.pop("time_budget_s", None)  # the reproduction fixes the step count instead
    if result.schedule_steps != defaults.steps:
        overrides["steps"] = result.schedule_steps
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items()) + f" --valid-every {valid_every}"
    command = (f"prescope train-tiny --prepare-only --out .cache/tiny-data{flags} && "
               f"prescope train-tiny --data .cache/tiny-data --out prescope-tiny{flags}")
    return {
        "name": "prescope-tiny",
        "architecture": {"class": type(model).__name__, "model_type": model.config.model_type,
                         "num_layers": config.num_layers, "num_experts": config.num_experts, "top_k": config.top_k,
                         "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                         "num_heads": config.num_heads, "vocab_size": config.vocab_size,
                         "tie_embeddings": config.tie_embeddings, "norm_topk_prob": False},
        "params": count_parameters(model),
        "bytes": None,
        "training": {"steps": result.steps, "steps_run": result.steps_run, "schedule_steps": result.schedule_steps,
                     "valid_every": valid_every, "tokens_seen": result.tokens, "wall_s": round(result.wall_s, 1),
                     "s_per_step": round(result.step_s, 4), "hardware": hardware,
                     "batch": f"{config.batch_size} x {config.seq_len} tokens", "lr": config.lr,
                     "final_train_loss": round(float(np.mean(result.losses[-20:])), 4),
                     "train_tokens_in_corpus": int(sum(d["train_tokens"] for d in record["domains"].values())),
                     "precision": "bf16 autocast, fp32 master weights" if device.startswith("cuda") else "fp32"},
        "config": dataclasses.asdict(config),
        "corpus": record["domains"],
        "heldout": table.to_dict(orient="records"),
        "validation_curve": list(result.monitor),
        "continuations": continuations,
        "python": record["python"],
        "torch": torch.__version__,
        "command": command,
        "argv": " ".join(shlex.quote(a) for a in sys.argv),
        CARD_ROUTING_KEY: None,
    }
