"""LARV's cost at real scale: real-size CLIP vision towers with random weights and synthetic,
structured task vectors; base merger time vs LARV's extra time, peak memory with and without LARV,
exact vs randomized spectra.

    python -m larv_lab.bench_cost --models b32 b16 l14 --tasks 8 14 20 --device cpu

Nothing is downloaded: the towers are ``transformers.CLIPVisionModel(CLIPVisionConfig(...))``.
Timings are medians over ``--repeats`` (the machine may be shared: ratios within one run are
the figures to trust). Peak memory on CPU is the process's peak resident set (Linux ``VmHWM``,
reset through ``/proc/self/clear_refs`` before each phase) minus the resident set at the start of
the phase: what the phase added, all allocators included. On CUDA it is
``torch.cuda.max_memory_allocated`` over the phase minus the allocated memory at its start.

With ``--device cuda`` the pool (θ_0 and the task models) lives on the GPU too (``--pool-device``
says otherwise), so TA and TIES merge there; Iso-C, Iso-CTS, TSV-M and WUDI compute on
FusionBench's Fabric device, which is the GPU whenever one is visible. The task vectors are drawn
on the CPU (the same numbers on every device) and moved. ``lab/benchmarks/gpu_check.sh`` runs the
whole GPU grid in one command.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from copy import deepcopy
from dataclasses import replace
from datetime import datetime, timezone

import torch

from fusion_bench_larv.core.diagnostics import (
    exact_energies,
    randomized_energies,
    singular_values,
    small_gram,
)
from fusion_bench_larv.core.layers import group_layers
from fusion_bench_larv.core.settings import LarvSettings
from fusion_bench_larv.core.stats_cache import Theta0Stats
from fusion_bench_larv.core.veneer import (
    _LazyDelta,
    apply_scales,
    compute_larv_scales,
    layer_diagnostics,
)

CONFIGS = {  # HF CLIP ViT vision towers (openai/clip-vit-*)
    "b32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, patch_size=32, image_size=224),
    "b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, patch_size=16, image_size=224),
    "l14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, patch_size=14, image_size=224),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, patch_size=32, image_size=64),  # smoke test only
}  # fmt: skip
NAMES = {"b32": "ViT-B/32", "b16": "ViT-B/16", "l14": "ViT-L/14", "tiny": "tiny"}
# data-free mergers of config/larv/mergers.yaml that the benchmark runs (each with its larv_<name>
# config's hyperparameters); the paper's five first
MERGERS = ["ta", "ties", "iso_c", "iso_cts", "tsvm", "wudi", "simple_average"]
LABELS = {"ta": "TA", "ties": "TIES", "iso_c": "Iso-C", "iso_cts": "Iso-CTS", "tsvm": "TSV-M",
          "wudi": "WUDI", "simple_average": "Simple Avg"}  # fmt: skip
# Hydra overrides of a merger's base config (``--wudi-iter-num``), set once in main()
BASE_OVERRIDES: dict[str, tuple[str, ...]] = {}


# -- measurement helpers ---------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return -1


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Phase:
    """Wall time and peak memory added by a block of code."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.mem0 = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.mem0 = _status("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.mem0
            self.retained = torch.cuda.memory_allocated() - self.mem0
        else:
            self.peak = _status("VmHWM") - self.mem0
            self.retained = _status("VmRSS") - self.mem0
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    out, ts = None, []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts, out


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# -- models --------------------------------------------------------------------------------------
def build_tower(kind: str, seed: int = 0) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**CONFIGS[kind]))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def task_vector(theta0: dict, task: int, num_layers: int) -> dict:
    """A synthetic fine-tuning update with realistic structure: per weight matrix a low-rank part
    (70% of its energy; rank 4 in the first block growing to 64 in the last, in a random subspace
    per task) plus dense noise (30%), with ‖τ‖_F / ‖θ_0‖_F growing with depth from 0.5% to 2%
    (the range of CLIP ViT fine-tunes); biases and norms get small dense noise."""
    g = torch.Generator().manual_seed(1000 + task)
    tv = {}
    for k, v in theta0.items():
        if not v.is_floating_point():
            continue
        depth = 0.5
        parts = k.split(".")
        if "layers" in parts:
            depth = int(parts[parts.index("layers") + 1]) / max(1, num_layers - 1)
        rel = 0.005 + 0.015 * depth
        target = rel * float(v.norm()) if float(v.norm()) > 0 else rel * v.numel() ** 0.5 * 1e-2
        if v.ndim >= 2:
            mat = v.reshape(v.shape[0], -1)  # only its shape is read: τ is drawn on the CPU
            m, n = mat.shape
            r = min(round(4 * 2 ** (4 * depth)), m, n)
            low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
            noise = torch.randn(m, n, generator=g)
            d = (0.7**0.5) * low / low.norm() + (0.3**0.5) * noise / noise.norm()
            tv[k] = (target * d).reshape(v.shape)
        else:
            noise = torch.randn(v.shape, generator=g)
            tv[k] = target * noise / noise.norm()
    return tv


_POOLS: dict = {}  # kind -> (models, theta0): grown task by task, shared across K


def make_pool(kind: str, num_tasks: int, device: torch.device | str = "cpu"):
    """An in-memory pool with ``num_tasks`` fine-tuned towers on ``device``; a larger K extends
    the smaller one (tasks 0..K−1 are the same task vectors whatever K, drawn on the CPU)."""
    if kind not in _POOLS:
        pretrained = build_tower(kind).to(device)
        _POOLS.clear()
        _POOLS[kind] = ({"_pretrained_": pretrained},
                        {k: v.clone() for k, v in pretrained.state_dict().items()})  # fmt: skip
    models, theta0 = _POOLS[kind]
    layers = CONFIGS[kind]["num_hidden_layers"]
    for t in range(len(models) - 1, num_tasks):
        m = deepcopy(models["_pretrained_"])
        restore(m, theta0)
        sd = m.state_dict()
        for k, d in task_vector(theta0, t, layers).items():
            sd[k].add_(d.to(sd[k].device))
        models[f"task_{t}"] = m
    return {
        k: models[k] for k in ["_pretrained_"] + [f"task_{t}" for t in range(num_tasks)]
    }, theta0


@torch.no_grad()
def ta_merged_state(kind: str, num_tasks: int, theta0: dict, scaling: float = 0.3) -> dict:
    """θ_0 + λ Σ τ_i without holding the task models (for sizes whose pool does not fit)."""
    layers = CONFIGS[kind]["num_hidden_layers"]
    merged = {k: v.clone() for k, v in theta0.items()}
    for t in range(num_tasks):
        for k, d in task_vector(theta0, t, layers).items():
            merged[k].add_(d.to(merged[k].device), alpha=scaling)
    return merged


def restore(module: torch.nn.Module, theta0: dict) -> None:
    with torch.no_grad():
        sd = module.state_dict()
        for k, v in theta0.items():
            sd[k].copy_(v)


def base_merger(name: str):
    """A fresh instance of merger ``name`` with the hyperparameters of its ``larv_<name>`` config
    (config/method/larv_<name>.yaml: the paper's, App. C.2)."""
    from hydra.utils import instantiate

    return instantiate(_base_config(name), _recursive_=False)


@functools.cache
def _base_config(name: str) -> dict:
    from .reproduce.registry import base_method_config

    # composed once, outside the timed loops
    return base_method_config(name, BASE_OVERRIDES.get(name, ()))


# -- measurements --------------------------------------------------------------------------------
def larv_steps(theta0, merged_sd, settings, device, stats=None):
    """What LARVAlgorithm.run adds after the base merger (placement: merged), timed per step."""
    t = {}
    _sync(device)
    t0 = time.perf_counter()
    res = compute_larv_scales(theta0, merged_sd, settings, device=device, progress=False,
                              theta0_stats=stats)  # fmt: skip
    _sync(device)
    t["diagnostics_and_gate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply_scales(theta0, merged_sd, res.param_scale)
    _sync(device)
    t["apply"] = time.perf_counter() - t0
    return t, res


def with_larv(models, theta_ref, pool, mname, settings, device, stats):
    """Base merger + LARV as LARVAlgorithm.run does it (own θ_0 copy, base merger, diagnostics,
    apply), from a restored pretrained model; returns LARV's timed steps and the θ_0 copy's
    seconds."""
    restore(models["_pretrained_"], theta_ref)
    theta0, clone_s = clone_theta0(models, device)
    merged = base_merger(mname).run(pool)
    steps, _ = larv_steps(theta0, merged.state_dict(), settings, device, stats)
    return steps, clone_s


def clone_theta0(models, device) -> tuple[dict, float]:
    """LARV's own copy of θ_0 (as LARVAlgorithm.run makes it) and the seconds it took."""
    _sync(device)
    t0 = time.perf_counter()
    theta0 = {k: v.detach().clone() for k, v in models["_pretrained_"].state_dict().items()}
    _sync(device)
    return theta0, time.perf_counter() - t0


def single_pass(models, theta_ref, pool, mname, settings, device, shared):
    """One base-merger run serves every figure of an expensive merger (Iso-C, Iso-CTS, TSV-M,
    WUDI: SVDs or an optimisation per matrix): the base merger is timed alone, then LARV (exact
    spectra, θ_0 copy included) on its output, then LARV with randomized spectra on a copy of that
    output. Peak base+LARV is composed from the two phases: max(peak of the base merger, what
    its output holds + LARV's own peak on top of it)."""
    cold = "stats" not in shared
    stats = shared.setdefault("stats", Theta0Stats.empty(settings))
    rset = replace(settings, spectrum="randomized", spectrum_tail="uniform")
    rstats = shared.setdefault("stats_randomized", Theta0Stats.empty(rset))
    restore(models["_pretrained_"], theta_ref)
    with Phase(device) as base:
        merged = base_merger(mname).run(pool)
    merged_sd = merged.state_dict()
    unscaled = {k: v.clone() for k, v in merged_sd.items()}

    def larv(target, s, st):
        theta0, clone_s = clone_theta0(models, device)
        steps, _ = larv_steps(theta0, target, s, device, st)
        return steps, clone_s

    with Phase(device) as ph:
        steps, clone_s = larv(merged_sd, settings, stats)
    del merged, merged_sd
    if not len(rstats):  # warm-up, untimed: θ_0's randomized statistics
        larv({k: v.clone() for k, v in unscaled.items()}, rset, rstats)
    rsteps, rclone_s = larv(unscaled, rset, rstats)
    extra = sum(steps.values()) + clone_s
    return {
        "protocol": "single pass (one base-merger run)",
        "base_seconds": base.seconds,
        "base_seconds_all": [base.seconds],
        "larv_extra_seconds_cold": extra if cold else None,
        "larv_extra_seconds_warm": None if cold else extra,
        "larv_extra_seconds_all": [extra],
        "larv_steps_seconds": steps,
        "theta0_copy_seconds": clone_s,
        "larv_extra_seconds_randomized_warm": sum(rsteps.values()) + rclone_s,
        "peak_bytes_base": base.peak,
        "peak_bytes_with_larv": max(base.peak, base.retained + ph.peak),
    }


def bench_base_and_larv(kind, num_tasks, mergers, device, repeats, settings, log, shared,
                        pool_device=None, out=None, checkpoint=None, single=()):  # fmt: skip
    """Base merger alone vs base merger + LARV on an in-memory pool (models already loaded).
    ``out`` is filled in place and ``checkpoint()`` called after each merger, so a run stopped
    part-way (a time limit) still leaves the mergers it finished."""
    from fusion_bench import BaseModelPool

    models, theta_ref = make_pool(kind, num_tasks, device if pool_device is None else pool_device)
    pool = BaseModelPool(models)
    out = {} if out is None else out
    out.update(num_tasks=num_tasks, mergers={})
    out["model_fp32_bytes"] = sum(v.numel() * v.element_size() for v in theta_ref.values())
    for mname in mergers:
        _base_config(mname)  # compose the config before anything is timed
        if mname in single:
            x = single_pass(models, theta_ref, pool, mname, settings, device, shared)
            base, cold, warm = (
                x["base_seconds"],
                x["larv_extra_seconds_cold"],
                x["larv_extra_seconds_warm"],
            )
            x["ratio_cold"] = None if cold is None else cold / base
            x["ratio_warm"] = None if warm is None else warm / base
            x["ratio_randomized_warm"] = x["larv_extra_seconds_randomized_warm"] / base
            x["base_overrides"] = list(BASE_OVERRIDES.get(mname, ()))
            out["mergers"][mname] = x
            log(f"  {NAMES[kind]} K={num_tasks} {mname} (single pass): base {base:.2f}s, LARV extra "
                f"{cold or warm:.2f}s ({'cold' if cold else 'warm'}), randomized "
                f"{x['larv_extra_seconds_randomized_warm']:.2f}s, peak +{x['peak_bytes_base'] / 2**20:.0f}"
                f" / +{x['peak_bytes_with_larv'] / 2**20:.0f} MiB")  # fmt: skip
            if checkpoint is not None:
                checkpoint()
            continue
        reps = repeats if mname == "ta" else 1
        base_t, base_mem, larv_t, larv_cold_t, total_mem, clone_t = [], [], [], [], [], []
        for r in range(reps):
            # θ_0 is the same tower for every K and merger: its statistics are computed in the
            # first LARV run of the sweep (cold) and reused by all later ones (warm), as
            # `stats_cache_dir` or a shared Theta0Stats would do
            cold = "stats" not in shared
            stats = shared.setdefault("stats", Theta0Stats.empty(settings))
            restore(models["_pretrained_"], theta_ref)
            with Phase(device) as ph:
                merged = base_merger(mname).run(pool)
            base_t.append(ph.seconds)
            base_mem.append(ph.peak)
            del merged
            with Phase(device) as ph:
                steps, clone_s = with_larv(models, theta_ref, pool, mname, settings, device, stats)
            total_mem.append(ph.peak)
            clone_t.append(clone_s)
            (larv_cold_t if cold else larv_t).append(sum(steps.values()) + clone_s)
            log(f"  {NAMES[kind]} K={num_tasks} {mname} rep {r}: base {base_t[-1]:.2f}s, "
                f"LARV extra {(larv_cold_t + larv_t)[-1]:.2f}s "
                f"({ {k: round(v, 2) for k, v in steps.items()} }, θ_0 copy {clone_s:.2f}s), "
                f"peak +{base_mem[-1] / 2**20:.0f} / +{total_mem[-1] / 2**20:.0f} MiB")  # fmt: skip
        # the same veneer with randomized spectra (uniform tail), θ_0 statistics warm: what the
        # diagnostics cost when the eigen-solves are replaced by sketches
        rset = replace(settings, spectrum="randomized", spectrum_tail="uniform")
        rstats = shared.setdefault("stats_randomized", Theta0Stats.empty(rset))
        if not len(rstats):  # warm-up, untimed: computes θ_0's randomized statistics
            with_larv(models, theta_ref, pool, mname, rset, device, rstats)
        rand_t = []
        for _ in range(reps):
            steps, clone_s = with_larv(models, theta_ref, pool, mname, rset, device, rstats)
            rand_t.append(sum(steps.values()) + clone_s)
        log(f"  {NAMES[kind]} K={num_tasks} {mname}: LARV extra, randomized spectra (warm) "
            f"{statistics.median(rand_t):.2f}s")  # fmt: skip
        base = statistics.median(base_t)
        warm = statistics.median(larv_t) if larv_t else None
        cold = statistics.median(larv_cold_t) if larv_cold_t else None
        out["mergers"][mname] = {
            "base_seconds": base,
            "base_seconds_all": base_t,
            "larv_extra_seconds_cold": cold,  # θ_0 statistics computed in the run
            "larv_extra_seconds_warm": warm,  # θ_0 statistics precomputed / cached
            "larv_extra_seconds_all": larv_cold_t + larv_t,
            "theta0_copy_seconds": statistics.median(clone_t),
            "ratio_cold": None if cold is None else cold / base,
            "ratio_warm": None if warm is None else warm / base,
            "larv_extra_seconds_randomized_warm": statistics.median(rand_t),
            "ratio_randomized_warm": statistics.median(rand_t) / base,
            "peak_bytes_base": max(base_mem),
            "peak_bytes_with_larv": max(total_mem),
            "base_overrides": list(BASE_OVERRIDES.get(mname, ())),
        }
        if checkpoint is not None:
            checkpoint()
    restore(models["_pretrained_"], theta_ref)
    del models, pool
    _trim()
    return out


@torch.no_grad()
def bench_floor(kind, device, repeats, log):
    """The dense linear algebra that exact LARV cannot avoid, on random matrices of the tower's
    block shapes (float32): one eigen-solve of the smaller Gram per matrix of Δ, the two products
    of each square commutator, and Δ's Gram plus θ_0ᵀΔ per rectangular matrix. LARV's measured
    time over this floor is what the implementation itself costs."""
    cfg = CONFIGS[kind]
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    sq = torch.randn(2, h, h, generator=g).to(device)
    rect = torch.randn(2, f, h, generator=g).to(device)
    spd = (sq[0].mT @ sq[0]) / (h * h)
    n_sq, n_rect = 4 * layers, 2 * layers

    def eig():
        for _ in range(n_sq + n_rect):
            torch.linalg.eigvalsh(spd)

    def square():
        for _ in range(n_sq):
            sq[0] @ sq[1]
            sq[1] @ sq[0]

    def rectangular():
        for _ in range(n_rect):
            rect[1].mT @ rect[1]
            rect[0].mT @ rect[1]

    out = {}
    for name, fn in (("eig", eig), ("square_commutators", square), ("rect_products", rectangular)):
        out[f"{name}_seconds"], _, _ = timed(fn, device, repeats)
    out["floor_exact_seconds"] = sum(out.values())
    out["floor_randomized_seconds"] = (
        out["square_commutators_seconds"] + out["rect_products_seconds"]
    )
    out["counts"] = {"matrices": n_sq + n_rect, "square": n_sq, "rectangular": n_rect}
    log(f"  {NAMES[kind]} dense-LA floor: {out['floor_exact_seconds']:.2f}s exact "
        f"(eig {out['eig_seconds']:.2f}s, square {out['square_commutators_seconds']:.2f}s, "
        f"rect {out['rect_products_seconds']:.2f}s), {out['floor_randomized_seconds']:.2f}s "
        "without eigen-solves")  # fmt: skip
    return out


def bench_larv_only(kind, num_tasks, device, repeats, settings, log):
    """LARV's cost on a merged model formed without the pool (memory too small for the pool)."""
    pretrained = build_tower(kind)
    theta0 = {k: v.clone() for k, v in pretrained.state_dict().items()}
    del pretrained
    merged = ta_merged_state(kind, num_tasks, theta0)
    out = {"num_tasks": num_tasks, "note": "base merger not run (pool would not fit in memory); "
           "merged = θ_0 + 0.3 Σ τ_i formed task by task"}  # fmt: skip
    target = {k: v.clone() for k, v in merged.items()}
    with Phase(device) as ph:
        steps, _ = larv_steps(theta0, target, settings, device)
    out["larv_extra_seconds_cold"] = sum(steps.values())
    out["peak_bytes_larv_cold"] = ph.peak
    stats = Theta0Stats.empty(settings)
    compute_larv_scales(theta0, merged, settings, device=device, progress=False,
                        theta0_stats=stats)  # fmt: skip
    warm = []
    for _ in range(repeats):
        target = {k: v.clone() for k, v in merged.items()}
        with Phase(device) as ph:
            steps, _ = larv_steps(theta0, target, settings, device, stats)
        warm.append(sum(steps.values()))
    out["larv_extra_seconds_warm"] = statistics.median(warm)
    out["larv_extra_seconds_all"] = warm
    out["peak_bytes_larv_warm"] = ph.peak
    out["theta0_stats_bytes"] = stats.nbytes()
    out["model_fp32_bytes"] = sum(v.numel() * 4 for v in theta0.values())
    log(f"  {NAMES[kind]} K={num_tasks} LARV only: cold {out['larv_extra_seconds_cold']:.2f}s, "
        f"warm {out['larv_extra_seconds_warm']:.2f}s")  # fmt: skip
    return out, theta0, merged


@torch.no_grad()
def bench_spectra(
    kind,
    theta0,
    merged,
    device,
    repeats,
    log,
    max_matrices,
    spearman_too,
    stats=None,
    rank=2,
    oversample=10,
):
    """Exact (Gram eigenvalues; and the old full svdvals for one matrix) vs randomized spectra on
    the MLP matrices of Δ, and the Spearman agreement of e across layers."""
    names = [k for k, v in theta0.items() if v.is_floating_point()]
    groups = group_layers(names)
    mlp = [k for k in names if (".mlp.fc1.weight" in k or ".mlp.fc2.weight" in k)]
    mlp = mlp[: max_matrices or None]
    delta = _LazyDelta(theta0, merged, names)
    out = {"matrices": len(mlp), "shapes": sorted({tuple(theta0[k].shape) for k in mlp})}
    ys = [delta.on(k, device) for k in mlp]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(len(ys))]  # noqa: E731

    def exact_all():
        return [exact_energies(gram=small_gram(y[None]), dtype=torch.float32) for y in ys]

    def rand_all():
        return [
            randomized_energies(y[None], rank, oversample, [g])
            for y, g in zip(ys, gens(), strict=True)
        ]

    t_ex, _, _ = timed(exact_all, device, repeats)
    t_rd, _, _ = timed(rand_all, device, repeats)
    t_svd, _, _ = timed(lambda: singular_values(ys[0]), device, 1)
    out.update(exact_seconds=t_ex, randomized_seconds=t_rd, speedup=t_ex / t_rd,
               full_svdvals_seconds_one_matrix=t_svd,
               exact_seconds_one_matrix=t_ex / len(ys))  # fmt: skip
    out["spearman_e"] = out["spearman_e_uniform_tail"] = None
    if spearman_too:
        e = {}
        for spectrum, tail in (
            ("exact", "none"),
            ("randomized", "none"),
            ("randomized", "uniform"),
        ):
            s = LarvSettings(spectrum=spectrum, rank=rank, oversample=oversample,
                             spectrum_tail=tail)  # fmt: skip
            st = stats if (stats is not None and spectrum == "exact") else None
            e[spectrum, tail], _, _ = layer_diagnostics(theta0, delta, groups, s, device, False, st)
        out["e_exact"] = e["exact", "none"]
        out["e_randomized"] = e["randomized", "none"]
        out["e_randomized_uniform_tail"] = e["randomized", "uniform"]
        out["spearman_e"] = spearman(out["e_exact"], out["e_randomized"])
        out["spearman_e_uniform_tail"] = spearman(out["e_exact"], out["e_randomized_uniform_tail"])
    log(f"  {NAMES[kind]} spectra on {len(ys)} MLP matrices: exact {t_ex:.2f}s, randomized "
        f"{t_rd:.3f}s ({out['speedup']:.1f}x); one full svdvals {t_svd:.2f}s; "
        f"Spearman(e) {out['spearman_e']} (top-k only), {out['spearman_e_uniform_tail']} (uniform tail)")  # fmt: skip
    return out


# -- report --------------------------------------------------------------------------------------
def mib(b):
    return f"{b / 2**20:,.0f} MiB"


def fmt(x):
    return "–" if x is None else f"{x:.2f}"


def pct(x):
    return "–" if x is None else f"{100 * x:.0f}%"


def cost_row_label(name: str, x: dict) -> str:
    """A table's merger cell: its label, plus any override of its base config (reduced WUDI)."""
    label = LABELS.get(name, name)
    over = [o.rsplit(".", 1)[-1] for o in x.get("base_overrides", [])]
    if x.get("protocol", "").startswith("single pass"):
        over.append("single pass")
    return f"{label} ({', '.join(over)})" if over else label


def markdown(res: dict) -> str:
    lines = [f"# LARV cost benchmark ({res['device']})", "",
             f"Command: `{res['command']}`", "",
             f"Date: {res['date']}; host: {res['host']}; torch {res['torch']}; "
             f"threads {res['threads']}; load average at start {res['loadavg_start']}, "
             f"at end {res['loadavg_end']}.", "",
             res["notes"], "",
             "## Base merger vs LARV's extra time and peak memory", "",
             "| model | K | merger | base (s) | LARV extra cold (s) | warm (s) | extra/base cold | "
             "warm | randomized warm (s) | extra/base | peak base | peak base+LARV | LARV adds "
             "| fp32 model |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, r in res["models"].items():
        for run in r.get("pool_runs", []):
            for m, x in run.get("mergers", {}).items():
                add = x["peak_bytes_with_larv"] - x["peak_bytes_base"]
                warm = "–" if x["larv_extra_seconds_warm"] is None else (
                    f"{x['larv_extra_seconds_warm']:.2f}")  # fmt: skip
                rw = "–" if x["ratio_warm"] is None else f"{100 * x['ratio_warm']:.0f}%"
                lines.append(
                    f"| {NAMES[kind]} | {run['num_tasks']} | {cost_row_label(m, x)} "
                    f"| {x['base_seconds']:.2f} "
                    f"| {fmt(x['larv_extra_seconds_cold'])} | {warm} "
                    f"| {pct(x['ratio_cold'])} | {rw} "
                    f"| {fmt(x.get('larv_extra_seconds_randomized_warm'))} "
                    f"| {pct(x.get('ratio_randomized_warm'))} | {mib(x['peak_bytes_base'])} "
                    f"| {mib(x['peak_bytes_with_larv'])} | {mib(add)} "
                    f"({add / run['model_fp32_bytes']:.2f} copies) | {mib(run['model_fp32_bytes'])} |"
                )
        if "larv_only" in r:
            x = r["larv_only"]
            lines.append(
                f"| {NAMES[kind]} | {x['num_tasks']} | (not run) | – | "
                f"{x['larv_extra_seconds_cold']:.2f} | {x['larv_extra_seconds_warm']:.2f} | – | – "
                f"| – | – "
                f"| – | – | LARV phase alone: +{mib(x['peak_bytes_larv_cold'])} | "
                f"{mib(x['model_fp32_bytes'])} |"
            )
    floors = [(kind, r) for kind, r in res["models"].items() if "floor" in r]
    if floors:
        lines += ["", "## Dense linear-algebra floor (what exact LARV cannot avoid) vs LARV warm", "",
                  "| model | eigen-solves (s) | square commutators (s) | rectangular products (s) "
                  "| floor exact (s) | LARV warm (s) | floor randomized (s) | LARV randomized warm (s) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for kind, r in floors:
            x = r["floor"]
            ta = [run["mergers"]["ta"] for run in r.get("pool_runs", []) if "ta" in run["mergers"]]
            warm = fmt(ta[0]["larv_extra_seconds_warm"]) if ta else "–"
            rw = fmt(ta[0].get("larv_extra_seconds_randomized_warm")) if ta else "–"
            lines.append(
                f"| {NAMES[kind]} | {x['eig_seconds']:.2f} | {x['square_commutators_seconds']:.2f} "
                f"| {x['rect_products_seconds']:.2f} | {x['floor_exact_seconds']:.2f} | {warm} "
                f"| {x['floor_randomized_seconds']:.2f} | {rw} |"
            )
    lines += ["", "## Exact vs randomized spectra (MLP matrices of Δ; Spearman of e across layers)",
              "", "| model | matrices | exact (s) | randomized (s) | speed-up | one full svdvals (s) "
              "| one Gram-eig (s) | Spearman e (top-k only) | Spearman e (uniform tail) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, r in res["models"].items():
        if "spectra" in r:
            x = r["spectra"]
            lines.append(
                f"| {NAMES[kind]} | {x['matrices']} {x['shapes']} | {x['exact_seconds']:.2f} | "
                f"{x['randomized_seconds']:.3f} | {x['speedup']:.1f}x | "
                f"{x['full_svdvals_seconds_one_matrix']:.2f} | {x['exact_seconds_one_matrix']:.3f} "
                f"| {fmt(x['spearman_e'])} | {fmt(x.get('spearman_e_uniform_tail'))} |"
            )
    return "\n".join(lines) + "\n"


def device_label(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: the device first, then the card's name."""
    if device.type != "cuda":
        return str(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["b32", "b16", "l14"], choices=list(CONFIGS))
    ap.add_argument("--tasks", nargs="+", type=int, default=[8, 14, 20])
    ap.add_argument("--mergers", nargs="+", default=["ta", "ties"], choices=MERGERS)
    ap.add_argument("--ties-max-tasks", type=int, default=8,
                    help="mergers other than TA only up to this K")  # fmt: skip
    ap.add_argument("--wudi-iter-num", type=int, default=None,
                    help="WUDI's iter_num (its config: 400); a reduced one is reported as such")  # fmt: skip
    ap.add_argument("--single-pass", nargs="*", default=[], choices=MERGERS, metavar="MERGER",
                    help="mergers measured from one base-merger run (see single_pass)")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where LARV's diagnostics run")
    ap.add_argument("--pool-device", default=None,
                    help="where the pool's models live and TA/TIES merge (default: --device)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-fraction", type=float, default=0.75,
                    help="skip pools needing more than this fraction of MemAvailable")  # fmt: skip
    ap.add_argument("--spectra-models", nargs="+", default=["b32", "l14"])
    ap.add_argument("--spectra-only", action="store_true", help="no mergers: spectra only")
    ap.add_argument("--spectra-max-matrices", type=int, default=0, help="0 = all MLP matrices")
    ap.add_argument("--spearman-models", nargs="+", default=["b32", "b16", "l14"])
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    pool_device = torch.device(args.pool_device or args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    BASE_OVERRIDES.clear()
    if args.wudi_iter_num is not None:
        BASE_OVERRIDES["wudi"] = (f"method.base_method.iter_num={args.wudi_iter_num}",)
    _base_config.cache_clear()
    settings = LarvSettings()
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or f"{args.device}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"

    def log(msg):
        print(msg, flush=True)

    res = {
        "command": "python -m larv_lab.bench_cost " + " ".join(argv or sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.machine()} {os.cpu_count()} logical CPUs",
        "device": device_label(device),
        "pool_device": str(pool_device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "base_overrides": {k: list(v) for k, v in BASE_OVERRIDES.items()},
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "settings": settings.to_dict(),
        "notes": (
            "Random-weight towers, synthetic task vectors (per matrix: low rank 4→64 with depth + 30% "
            "dense noise, "
            "‖τ‖/‖θ_0‖ 0.5%→2% with depth). LARV extra = θ_0 copy + diagnostics + gate + apply "
            "(what LARVAlgorithm.run adds for placement=merged); 'cold' computes θ_0's statistics "
            "in the run, 'warm' reuses them (precomputed once per sweep or read from "
            "`stats_cache_dir`). Peak memory: see the script's docstring."
        ),
        "models": {},
    }
    if pool_device.type == "cuda":
        avail = torch.cuda.mem_get_info(pool_device)[0]  # free memory on the card
    else:
        with open("/proc/meminfo") as f:
            avail = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable"))
    for kind in args.models:
        log(f"{NAMES[kind]}")
        r = res["models"].setdefault(kind, {})
        shared: dict = {}  # θ_0's statistics, shared by the runs of this tower
        nparams = sum(p.numel() for p in build_tower(kind).parameters())
        model_bytes = nparams * 4
        for k in [] if args.spectra_only else args.tasks:
            need = (k + 5) * model_bytes  # pool + TA's transient dicts + LARV's θ_0 copy
            if need > args.memory_fraction * avail:
                log(f"  K={k}: pool needs ~{mib(need)} > {args.memory_fraction} of available "
                    f"{mib(avail)}; LARV measured on a merged model formed task by task")  # fmt: skip
                if "larv_only" not in r and not r.get("pool_runs"):
                    r["larv_only"], th0, mg = bench_larv_only(kind, k, device, args.repeats,
                                                              settings, log)  # fmt: skip
                    if kind in args.spectra_models:
                        r["spectra"] = bench_spectra(kind, th0, mg, device, args.repeats, log,
                                                     args.spectra_max_matrices,
                                                     kind in args.spearman_models)  # fmt: skip
                    del th0, mg
                continue
            mergers = [m for m in args.mergers if m == "ta" or k <= args.ties_max_tasks]
            run: dict = {}
            r.setdefault("pool_runs", []).append(run)
            bench_base_and_larv(kind, k, mergers, device, args.repeats, settings, log, shared,
                                pool_device, run, lambda: dump(res, args.out, tag),
                                args.single_pass)  # fmt: skip
            if "floor" not in r:
                r["floor"] = bench_floor(kind, device, args.repeats, log)
            dump(res, args.out, tag)
        if kind in args.spectra_models and "spectra" not in r:
            pretrained = build_tower(kind).to(pool_device)
            th0 = {k: v.clone() for k, v in pretrained.state_dict().items()}
            mg = ta_merged_state(kind, min(args.tasks), th0)
            r["spectra"] = bench_spectra(kind, th0, mg, device, args.repeats, log,
                                         args.spectra_max_matrices, kind in args.spearman_models,
                                         shared.get("stats"))  # fmt: skip
            dump(res, args.out, tag)
            del th0, mg, pretrained
        _trim()
        _POOLS.clear()
        dump(res, args.out, tag)
    print(markdown(dump(res, args.out, tag)))


def dump(res: dict, out: str, tag: str) -> dict:
    """Write the JSON and markdown so far (a partial run still leaves its figures)."""
    res["loadavg_end"] = os.getloadavg()
    for ext, text in (
        ("json", json.dumps(res, indent=2,
                            default=lambda o: list(o) if isinstance(o, tuple) else str(o))),
        ("md", markdown(res)),
    ):  # fmt: skip
        path = os.path.join(out, f"cost-{tag}.{ext}")
        with open(path + ".tmp", "w") as f:  # a run killed mid-write keeps the previous file
            f.write(text)
        os.replace(path + ".tmp", path)
    return res


if __name__ == "__main__":
    main()
