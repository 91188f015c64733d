#!/usr/bin/env python
"""How large a built testbed's task vectors are, entry by entry, in the 2-D tensors that
FusionBench's WUDI optimises (``wudi_merging``: every 2-D tensor not in ``exclude_keys``, Adam at
lr 1e-5 for ``iter_num`` steps, started from the sum of the task vectors).

    python lab/scripts/task_vector_entries.py full text_full text_lora

Prints, per recipe and task, the median |τ| over the nonzero entries of those tensors, and WUDI's
reach in units of it: an Adam step moves an entry by about lr at most, so FusionBench's defaults
(400 steps at 1e-5) move it by about 4e-3 from the sum it starts at.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_entries(testbed) -> dict[str, float]:
    """{task: median |θ_t − θ_0| over the nonzero entries of θ_0's 2-D tensors}."""
    import torch

    pre = testbed.load_pretrained().state_dict()
    out = {}
    for task in testbed.tasks:
        ft = testbed.load_finetuned(task).state_dict()
        tau = torch.cat([(ft[k] - v).abs().flatten() for k, v in pre.items() if v.ndim == 2])
        out[task] = tau[tau > 0].median().item()
    return out


def main(argv: list[str] | None = None) -> int:
    from larv_lab.testbed.pools import open_testbed

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+", help="built testbed recipes (e.g. full text_full)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    for recipe in args.recipes:
        med = median_entries(open_testbed(recipe, args.cache_dir))
        typical = sorted(med.values())[len(med) // 2]
        print(f"{recipe}: median |τ| per task " + " ".join(f"{m:.1e}" for m in med.values()))
        print(f"  WUDI's reach at its defaults, 400 × 1e-5 = 4e-3: {4e-3 / typical:.1f} × that")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
