"""Measure: Mixtral-8x7B:4 twin, b1: engine logits under resident vs on_demand_lru (and +sync) at 25 %, same prompt.
With one wave per layer the same grouped kernel runs either way: logits should agree bit for bit unless a slot
is read before its copy landed."""
import json, os, sys, torch
from prescope.config import EngineConfig
from prescope.engine.engine import Engine
from prescope.engine.decode import generate
from prescope.models import twins

dev = "cuda" if torch.cuda.is_available() else "cpu"
name = sys.argv[1] if len(sys.argv) > 1 else "mixtral-8x7b"
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
if name.endswith("-tiny"):
    model = twins.build_twin(twins.tiny_twin_config(name.removesuffix("-tiny"), layers), device=dev, seed=0,
                             dtype=torch.float32)
else:
    model = twins.build_twin(name, num_layers=layers, device=dev, seed=0)
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=g)
out = {}
cells = [("resident", dict(policy="on_demand_lru", budget_share=1.0)),
         ("lru", dict(policy="on_demand_lru", budget_share=0.25)),
         ("lru+sync", dict(policy="on_demand_lru", budget_share=0.25, async_io=False)),
         ("cpu_misses", dict(policy="cpu_misses", budget_share=0.25)),
         ("prescope", dict(policy="prescope", budget_share=0.25))]
res = {}
with torch.no_grad():
    st = model.generate(ids.to(dev), max_new_tokens=32, do_sample=False, output_logits=True, return_dict_in_generate=True,
                        pad_token_id=0)
res["stock"] = (st.sequences.cpu(), torch.stack([x.float() for x in st.logits]).cpu(), "stock")
for label, kw in cells:
    try:
        with Engine(model, EngineConfig(device=dev, **kw)) as eng:
            gen = generate(eng, ids, max_new_tokens=32, keep_logits=True)
            res[label] = (gen.sequences.cpu(), torch.stack(gen.logits).cpu(), gen.mode)
    except Exception as exc:  # noqa: BLE001
        print(label, "failed:", repr(exc)[:300])
base_seq, base_log, _ = res["resident"]
for label, (seq, log, mode) in res.items():
    same = (seq == base_seq)[0, 128:]
    first = int((~same).nonzero()[0]) if (~same).any() else None
    upto = first if first is not None else log.shape[0]
    diff = (log[:upto + 1] - base_log[:upto + 1]).abs().amax(dim=(1, 2)) if upto else torch.zeros(1)
    top2 = base_log[first if first is not None else 0, 0].topk(2).values
    out[label] = dict(mode=mode, match=float(same.float().mean()), first_divergence=first,
                      max_logit_diff_per_step=[round(float(x), 4) for x in diff],
                      resident_top2_gap_at_divergence=float(top2[0] - top2[1]) if first is not None else None)
    print(label, json.dumps(out[label]))
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"diag-{name}.json"), "w"), indent=1)
