"""Experiments: measurements that produce the committed results in `reports/`.

- `bench`, `subjects`: policies measured on a GPU (shape twins, their prompts and routing); `benchfile`:
  the files a bench run writes, written and read back checked;
- `hfoffload`: Hugging Face accelerate's offload at the same budget, the baseline users would pick;
- `equivalence`: offloaded against stock output on a device; `fidelity`: simulated against measured;
- `simcompare`: every policy on several hardware profiles, simulated; `planspeed`: PreSched's own speed;
- `calibrate`: a profile measured on this machine; `modelcard`: prescope-tiny's routing for its card.
"""
