"""The regime card: how hard merging is on a suite, from the base mergers' numbers alone (no
LARV row is read), against the targets in ``config/larv/regime.yaml``.

With accuracies in % per task, ``pre`` (pretrained + head), ``ft`` (each fine-tuned model on its
own task) and ``acc_m`` (base merger ``m``), averages over the suite's tasks ``T``:

    finetune_gain = mean_T ft - mean_T pre                      (target >= min_finetune_gain_pp)
    normalized(m) = mean_T (acc_m / ft)                         (TA's: <= max_ta_normalized)
    spread        = max_m mean_T acc_m - min_m mean_T acc_m     (target >= min_base_spread_pp)

over the data-free mergers present. A missing merger is listed, never imputed; a lab config that
computes it (a registry ``stands_in_for``: TIES one tensor at a time, ...) counts as it, and the
card says so. A task whose
fine-tuned accuracy is 0 (a generation task the fine-tuning did not teach) has no ratio
acc_m / ft: ``normalized`` averages over the other tasks, and is None when none is left.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from .registry import find_config, registry

__all__ = ["card_mergers", "regime_card", "targets"]


@cache
def targets() -> dict:
    """``config/larv/regime.yaml`` as a plain dict."""
    path = find_config(Path("larv") / "regime.yaml")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def card_mergers() -> list[str]:
    """The base rows a card reads: the targets' data-free mergers and the registry's stand-ins."""
    return [*targets()["data_free_mergers"], *registry().stand_ins()]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def regime_card(
    pretrained: Mapping[str, float],
    finetuned: Mapping[str, float],
    bases: Mapping[str, Mapping[str, float]],
    goals: Mapping | None = None,
    stand_ins: Mapping[str, str] | None = None,
) -> dict:
    """The card (module docstring); ``bases``: merger -> task -> accuracy in %; ``stand_ins``:
    lab config -> the merger it computes (default: the registry's ``stands_in_for``)."""
    goals = dict(goals or targets())
    stand_ins = registry().stand_ins() if stand_ins is None else stand_ins
    tasks = list(finetuned)
    if set(pretrained) != set(tasks):
        raise ValueError(f"pretrained and fine-tuned tasks differ: {sorted(pretrained)} vs {tasks}")
    wanted = list(goals["data_free_mergers"])
    used = {m: lab for lab, m in stand_ins.items() if lab in bases and m not in bases}
    present = {m: bases[used.get(m, m)] for m in wanted if m in bases or m in used}
    for m, acc in present.items():
        if set(acc) != set(tasks):
            raise ValueError(f"{m}: tasks {sorted(acc)} differ from the suite's {sorted(tasks)}")
    pre_avg = _mean(pretrained[t] for t in tasks)
    ft_avg = _mean(finetuned[t] for t in tasks)
    averages = {m: _mean(acc[t] for t in tasks) for m, acc in present.items()}
    scored = [t for t in tasks if finetuned[t] > 0]
    normalized = {m: _mean(acc[t] / finetuned[t] for t in scored) if scored else None
                  for m, acc in present.items()}  # fmt: skip
    spread = max(averages.values()) - min(averages.values()) if len(averages) > 1 else None
    ta = goals["ta_merger"]
    card = {
        "num_tasks": len(tasks),
        "tasks": tasks,
        "pretrained_head_average": pre_avg,
        "finetuned_average": ft_avg,
        "finetune_gain_pp": ft_avg - pre_avg,
        "ta_normalized_accuracy": normalized.get(ta),
        "base_averages": averages,
        "base_normalized": normalized,
        "base_spread_pp": spread,
        "best_base": max(averages, key=averages.get) if averages else None,
        "worst_base": min(averages, key=averages.get) if averages else None,
        "missing_mergers": [m for m in wanted if m not in present],
        **({"stand_ins": used} if used else {}),
        "targets": goals,
    }
    checks = {
        "finetune_gain": card["finetune_gain_pp"] >= goals["min_finetune_gain_pp"],
        "ta_normalized": None
        if normalized.get(ta) is None
        else normalized[ta] <= goals["max_ta_normalized"],
        "base_spread": None if spread is None else spread >= goals["min_base_spread_pp"],
    }
    card["meets"] = checks
    card["all_met"] = all(v is True for v in checks.values()) and not card["missing_mergers"]
    return card
