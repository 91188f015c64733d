#!/usr/bin/env python
"""How large a built testbed's task vectors are, entry by entry, in the 2-D tensors that
FusionBench's WUDI optimises (``wudi_merging``: every 2-D tensor not in ``exclude_keys``, Adam at
lr 1e-5 for ``iter_num`` steps, started from the sum of the task vectors).

    python lab/scripts/task_vector_entries.py full text_full text_lora

Prints, per recipe and task, the median |τ| over the nonzero entries of those tensors, and WUDI's
reach in units of it: an Adam step moves an entry by about lr at most, so ``iter_num`` steps move
it by about ``iter_num × lr`` from the sum it starts at. Both are read, not restated: ``iter_num``
from this plugin's ``larv_wudi`` config, lr from FusionBench's ``wudi_merging`` source, where it
is a literal (400 × 1e-5 = 4e-3 in FusionBench 0.2.33).
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


def wudi_settings() -> tuple[int, float]:
    """(iter_num, lr) of the WUDI runs: ``iter_num`` from ``config/method/larv_wudi.yaml``, lr
    from the ``torch.optim.Adam(..., lr=...)`` call in FusionBench's ``wudi_merging``."""
    import inspect
    import re

    from fusion_bench.method.wudi.wudi import wudi_merging
    from omegaconf import OmegaConf

    from fusion_bench_larv.config_paths import larv_config_dir

    iter_num = OmegaConf.load(larv_config_dir() / "method" / "larv_wudi.yaml").base_method.iter_num
    found = re.search(r"Adam\([^)]*\blr=([0-9.eE+-]+)", inspect.getsource(wudi_merging))
    if found is None:
        raise RuntimeError("no Adam(..., lr=...) in FusionBench's wudi_merging: read it by hand")
    return int(iter_num), float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    from larv_lab.testbed.pools import open_testbed

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+", help="built testbed recipes (e.g. full text_full)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    iter_num, lr = wudi_settings()
    reach = iter_num * lr
    for recipe in args.recipes:
        med = median_entries(open_testbed(recipe, args.cache_dir))
        typical = sorted(med.values())[len(med) // 2]
        print(f"{recipe}: median |τ| per task " + " ".join(f"{m:.1e}" for m in med.values()))
        print(
            f"  WUDI's reach, iter_num × lr = {iter_num} × {lr:g} = {reach:.1e}: "
            f"{reach / typical:.1f} × that"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
