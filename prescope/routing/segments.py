"""One long real sequence as several: consecutive segments of a trace's decode tokens as prompts of their own.

The real llama.cpp traces (`prescope/assets/data/routing`) hold one conversation each: one prompt, its prefill,
then a long decode. Cut into segments of consecutive decode tokens, each segment a prompt with its own id
(positions kept, decode steps renumbered from 1), the same real routing serves two uses:

- as the rows of a batch: segment i is row i, so a replay at batch B decodes B stretches of the real
  sequence together (real routing per row; the rows are parts of one conversation, not independent users);
- as units that a split by prompt (`Trace.split_by_prompt`) keeps whole: a segment's first token has no
  previous token in it, so no history crosses from one segment to another.

Letters: T tokens, L MoE layers, K top-k.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from prescope.routing.trace import Trace, TraceError


def decode_segments(trace: Trace, count: int) -> Trace:
    """The decode tokens of `trace`, each prompt's cut into `count` consecutive segments of (nearly) equal
    length, every segment a prompt numbered in order (prompt p's segments first); TraceError when a prompt
    has fewer than `count` decode tokens."""
    if count < 1:
        raise TraceError(f"segments must be >= 1, got {count}")
    decode = trace.decode_only()
    tokens = decode.tokens
    order = np.lexsort((tokens["position"].to_numpy(), tokens["call"].to_numpy(), tokens["prompt"].to_numpy()))
    frames, prompt_id = [], 0
    prompts = tokens["prompt"].to_numpy()[order]
    for p in np.unique(prompts):
        rows = order[prompts == p]  # [T_p] this prompt's decode tokens, in order
        if len(rows) < count:
            raise TraceError(f"prompt {p} has {len(rows)} decode tokens, fewer than the {count} segments asked")
        for part in np.array_split(rows, count):
            frames.append(pd.DataFrame({"index": part, "prompt": prompt_id, "step": np.arange(1, len(part) + 1),
                                        "call": prompt_id}))
            prompt_id += 1
    cut = pd.concat(frames, ignore_index=True)
    index = cut["index"].to_numpy()
    table = tokens.iloc[index].reset_index(drop=True).assign(
        prompt=cut["prompt"].to_numpy(), step=cut["step"].to_numpy(), call=cut["call"].to_numpy(), row=0)
    return Trace(decode.layout, table, decode.experts[index], decode.weights[index],
                 None if decode.hidden is None else decode.hidden[index],
                 None if decode.logits is None else decode.logits[index],
                 {**decode.meta, "segments": count})
