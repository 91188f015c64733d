"""LARV on state dicts: per-layer diagnostics → composite score → gate → per-parameter scales,
and the composition θ_LARV = θ_0 + s_ℓ·(θ_merged − θ_0). No FusionBench imports."""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .diagnostics import commutator_conflict, is_numerically_zero, rank_contrast
from .gates import composite_score, continuous_gate, depth_prior, depth_schedule, tiered_gate
from .layers import LayerGroups, group_layers
from .settings import LarvSettings

StateDict = Mapping[str, torch.Tensor]


@dataclass
class LayerRecord:
    index: int  # 1-based depth ℓ
    prefix: str
    e: float
    c: float
    r: float
    w: float
    s: float
    num_matrices: int
    num_params: int


@dataclass
class LarvResult:
    layers: list[LayerRecord]
    outside: list[dict]  # {name, layer, position, scale}
    param_scale: dict[str, float]  # every scaled (floating) parameter -> its scale
    thresholds: tuple[float, float] | None
    layer_pattern: str
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def scales(self) -> list[float]:
        return [rec.s for rec in self.layers]

    def to_dict(self) -> dict:
        return {
            "layer_pattern": self.layer_pattern,
            "num_layers": len(self.layers),
            "thresholds": list(self.thresholds) if self.thresholds is not None else None,
            "layers": [vars(rec) for rec in self.layers],
            "outside_blocks": self.outside,
            "diagnostics_seconds": self.seconds,
            "warnings": self.warnings,
        }


def _is_float(t: torch.Tensor) -> bool:
    return torch.is_floating_point(t)


def _storage_key(t: torch.Tensor) -> tuple | None:
    """Identity of the memory behind a tensor: tied weights (T5's `shared`, `encoder.embed_tokens`,
    `decoder.embed_tokens`, `lm_head`) are one tensor listed under several names."""
    ptr = t.untyped_storage().data_ptr()
    if ptr == 0:  # empty or meta: nothing to share
        return None
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _matrix_seed(seed: int, name: str) -> int:
    # a stable per-matrix seed: independent of dict order and of Python's hash randomisation
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def layer_diagnostics(
    theta0: StateDict,
    delta: StateDict,
    groups: LayerGroups,
    settings: LarvSettings,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """Mean e and mean c over each block's 2-D (or folded conv) weight matrices."""
    e_layers, c_layers, counts = [], [], []
    # progress=None: a bar appears only when the diagnostics take more than a moment (tqdm delay)
    bar = tqdm(groups.members, desc="LARV diagnostics", unit="layer", leave=False,
               disable=progress is False, delay=0 if progress else 1.5)  # fmt: skip
    for members in bar:
        e_vals, c_vals = [], []
        for name in members:
            t0, d = theta0[name], delta[name]
            if t0.ndim < 2 or not _is_float(t0):
                continue  # biases and norms are scaled but never enter the diagnostics
            if device is not None:
                t0, d = t0.to(device), d.to(device)
            gen = None
            if settings.spectrum == "randomized":
                gen = torch.Generator(device="cpu").manual_seed(_matrix_seed(settings.seed, name))
            e_vals.append(
                rank_contrast(
                    t0, d, settings.spectrum, settings.rank, settings.oversample, settings.eps, gen
                )
            )
            c_vals.append(
                0.0 if is_numerically_zero(d, t0) else commutator_conflict(t0, d, settings.eps)
            )
        counts.append(len(e_vals))
        e_layers.append(sum(e_vals) / len(e_vals) if e_vals else 0.0)
        c_layers.append(sum(c_vals) / len(c_vals) if c_vals else 0.0)
    return e_layers, c_layers, counts


def gate_scores(
    e: list[float], c: list[float], settings: LarvSettings
) -> tuple[list[float], list[float], tuple | None]:
    """Composite score w and scale s per layer for the configured gate."""
    w = composite_score(
        e, c, settings.eta, settings.rho, settings.zeta,
        settings.use_info, settings.use_depth_prior, settings.use_conflict,
    )  # fmt: skip
    thresholds = None
    if settings.gate == "tiered":
        s, thresholds = tiered_gate(w, settings.alpha, settings.beta, settings.levels)
    elif settings.gate == "continuous":
        s = continuous_gate(w, settings.gamma)
    else:
        s = depth_schedule(settings.schedule, len(w), settings.schedule_scales)
    return w, s, thresholds


def compute_larv_scales(
    theta0: StateDict,
    merged: StateDict,
    settings: LarvSettings,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> LarvResult:
    """Diagnostics of Δθ = θ_merged − θ_0 and the per-layer scales (spec, "Pipeline" 2–4)."""
    start = time.perf_counter()
    missing = [k for k in theta0 if k not in merged]
    extra = [k for k in merged if k not in theta0]
    if missing or extra:
        raise ValueError(
            f"θ_0 and the merged model have different parameters: missing in merged {missing[:5]}, "
            f"only in merged {extra[:5]}"
        )
    for k, t in merged.items():
        if t.shape != theta0[k].shape:
            raise ValueError(
                f"shape of {k!r} differs: θ_0 {tuple(theta0[k].shape)} vs merged {tuple(t.shape)}"
            )
    names = [k for k, t in theta0.items() if _is_float(t)]
    groups = group_layers(names, settings.layer_pattern)
    delta = {k: merged[k].detach().to(torch.float32) - theta0[k].detach().to(torch.float32)
             for k in names}  # fmt: skip
    e, c, counts = layer_diagnostics(theta0, delta, groups, settings, device, progress)
    warnings = []
    if all(is_numerically_zero(delta[k], theta0[k]) for k in names):
        warnings.append("the merged update θ_merged − θ_0 is zero everywhere; e = 0 in every layer")
    w, s, thresholds = gate_scores(e, c, settings)
    r = depth_prior(groups.num_layers)

    param_scale: dict[str, float] = {}
    layers = []
    for i, members in enumerate(groups.members):
        for name in members:
            param_scale[name] = s[i]
        layers.append(
            LayerRecord(
                i + 1,
                groups.prefixes[i],
                e[i],
                c[i],
                r[i],
                w[i],
                s[i],
                counts[i],
                sum(theta0[n].numel() for n in members),
            )  # fmt: skip
        )
    for name, li in groups.outside.items():
        param_scale[name] = s[li] if settings.outside_blocks == "nearest" else 1.0
    # A tensor tied under several names can take one scale only (applying each name's would
    # compound them): the first name in state-dict order decides, and the report says so.
    first_scale: dict[tuple, float] = {}
    for name in names:
        key = _storage_key(merged[name])
        if key is not None:
            param_scale[name] = first_scale.setdefault(key, param_scale[name])
    outside = []
    for name, li in groups.outside.items():
        outside.append({"name": name, "layer": li + 1, "position": groups.outside_position[name],
                        "scale": param_scale[name]})  # fmt: skip
    return LarvResult(layers, outside, param_scale, thresholds, groups.pattern,
                      time.perf_counter() - start, warnings)  # fmt: skip


@torch.no_grad()
def apply_scales(
    theta0: StateDict, merged: Mapping[str, torch.Tensor], param_scale: Mapping[str, float]
) -> None:
    """In place: merged[k] ← θ_0[k] + s_k·(merged[k] − θ_0[k]).

    A scale of exactly 1 leaves the tensor untouched, so unit scales reproduce the base merger
    bit for bit. Low-precision tensors are combined in float32 and cast back to their dtype.
    A tensor tied under several names is updated once, with the first of its names' scales.
    """
    done: set[tuple] = set()
    for name, s in param_scale.items():
        target = merged[name]
        key = _storage_key(target)
        if key is not None:
            if key in done:  # a tied weight already updated under another name
                continue
            done.add(key)
        if s == 1.0:
            continue
        base = theta0[name].to(device=target.device)
        if target.dtype in (torch.float32, torch.float64):
            new = base.to(target.dtype) + s * (target - base.to(target.dtype))
        else:
            b32 = base.to(torch.float32)
            new = (b32 + s * (target.to(torch.float32) - b32)).to(target.dtype)
        target.copy_(new)
