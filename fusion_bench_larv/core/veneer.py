"""LARV on state dicts: per-layer diagnostics → composite score → gate → per-parameter scales,
and the composition θ_LARV = θ_0 + s_ℓ·(θ_merged − θ_0). No FusionBench imports."""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import LarvInputError
from .diagnostics import (
    SpectrumOptions,
    as_matrix,
    compute_dtype,
    is_zero_update,
    pair_diagnostics,
    skip_theta0_sketches,
    theta0_statistics,
)
from .gates import composite_score, depth_prior, median
from .inputs import (
    check_finite,
    check_same_keys_and_shapes,
    check_scales,
    grouped_layers,
)
from .layers import LayerGroups
from .registry import apply_gate
from .settings import LarvSettings
from .state import TensorSpec, matrix_shape, spec_of
from .stats_cache import Theta0Stats, content_key, load_stats, save_stats

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
    # what each w was divided by before the continuous gate (`w_normalize: median`: the median of
    # w over the layers); None when the gate read w as it is
    w_normalizer: float | None = None
    # `diagnostics: per_task` only: each task's own result, by model name (its `param_scale` is
    # what multiplies that task vector); the fields above then hold the means over the tasks
    tasks: dict[str, LarvResult] | None = None

    @property
    def scales(self) -> list[float]:
        return [rec.s for rec in self.layers]

    def to_dict(self) -> dict:
        return {
            "layer_pattern": self.layer_pattern,
            "num_layers": len(self.layers),
            "thresholds": list(self.thresholds) if self.thresholds is not None else None,
            "w_normalizer": self.w_normalizer,
            "layers": [vars(rec) for rec in self.layers],
            "outside_blocks": self.outside,
            "diagnostics_seconds": self.seconds,
            "warnings": self.warnings,
            **({} if self.tasks is None else {"tasks": self._tasks_dict()}),
        }

    def _tasks_dict(self) -> dict:
        """Each task's own thresholds, normalizer, per-layer e, c, r, w, s and outside scales."""
        keep = ("thresholds", "w_normalizer", "layers", "outside_blocks", "warnings")
        return {t: {k: r.to_dict()[k] for k in keep} for t, r in (self.tasks or {}).items()}


def _is_float(t: torch.Tensor | TensorSpec) -> bool:
    return t.is_floating_point()


def _float_names(state: StateDict) -> list[str]:
    """The floating-point names, in state-dict order (read from specs: nothing is streamed)."""
    return [k for k in state if _is_float(spec_of(state, k))]


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


class _LazyDelta(Mapping):
    """Δθ = θ_merged − θ_0 (float32, float64 for float64 models) per parameter, computed on access
    and never stored: LARV holds no full copy of the update (docs/method.md, "Pipeline" 2)."""

    def __init__(self, theta0: StateDict, merged: StateDict, names: list[str]):
        self._theta0, self._merged, self._names = theta0, merged, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.on(name, None)

    def on(self, name: str, device: torch.device | str | None) -> torch.Tensor:
        m, t0 = self._merged[name].detach(), self._theta0[name].detach()
        if device is not None:
            m, t0 = m.to(device), t0.to(device)
        cd = compute_dtype(m.dtype)  # float64 models keep float64; others float32
        return m.to(cd) - t0.to(device=m.device, dtype=cd)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype Δ of ``name`` is formed in (``compute_dtype`` of the merged tensor's)."""
        return compute_dtype(self._merged[name].dtype)

    def stack(
        self, names: list[str], shape: tuple[int, int], device, theta0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Δ of same-shaped parameters as one ``(len(names), m, n)`` stack of matrices on
        ``device``, each written straight into its slice (no per-matrix temporary). ``theta0``:
        the same names' θ_0 already stacked on ``device`` (the same values, so the same Δ), so
        that a streamed θ_0 is not read twice."""
        dtype = self.dtype(names[0])
        out = torch.empty((len(names), *shape), dtype=dtype, device=device)
        for i, name in enumerate(names):
            m = self._merged[name].detach().to(device=device, dtype=dtype).reshape(shape)
            if theta0 is None:
                t0 = self._theta0[name].detach().to(device=device, dtype=dtype).reshape(shape)
            else:
                t0 = theta0[i].to(dtype)
            torch.sub(m, t0, out=out[i])
        return out

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# Stacks of the batched diagnostics (docs/method.md, "Numerics that do not change the value"):
# by default a stack on an accelerator holds at most BATCH_BYTES of θ_0 and at most
# 1/BATCH_FRACTION of all θ_0 matrices (both counted in float32), and always at least one matrix;
# the transient products are a few stacks' worth, small next to the model. On the CPU a stack is
# one matrix (CPU_BATCH_BYTES): stacking measured no faster there, the randomized path slower
# (docs/cost.md, "Batched spectra").
BATCH_BYTES = 256 * 2**20
BATCH_FRACTION = 8
CPU_BATCH_BYTES = 0


def shape_batches(
    names: list[str],
    theta0: StateDict,
    delta: _LazyDelta,
    device: torch.device | str | None = None,
    batch_bytes: int | None = None,
) -> list[list[str]]:
    """The stacks that the diagnostics run on: ``names`` grouped by matrix shape (``as_matrix``),
    θ_0's dtype, Δ's compute dtype and device (``device``, else where θ_0 lives), each group cut, in
    model order, into stacks of at most ``budget`` bytes of θ_0 counted in float32, at least one
    matrix each:

        budget = batch_bytes,  default min(BATCH_BYTES, Σ_names 4·numel / BATCH_FRACTION)
                               on an accelerator, CPU_BATCH_BYTES (one matrix) on the CPU.

    The stacks come ordered by their first matrix in model order, so the pass still streams
    through the model from its first blocks to its last (a stack may take matrices of several
    blocks: what a streamed θ_0 holds at once is one stack, whatever the blocks). Read from θ_0's
    specs only (:func:`~.state.spec_of`)."""
    total = sum(spec_of(theta0, n).numel() * 4 for n in names)
    default = min(BATCH_BYTES, total // BATCH_FRACTION)
    groups: dict[tuple, list[int]] = {}
    for i, n in enumerate(names):
        t = spec_of(theta0, n)
        dev = torch.device(device) if device is not None else t.device
        key = (matrix_shape(t), t.dtype, delta.dtype(n), dev)
        groups.setdefault(key, []).append(i)
    stacks: list[list[int]] = []
    for key, members in groups.items():
        budget = batch_bytes
        if budget is None:
            budget = CPU_BATCH_BYTES if key[3].type == "cpu" else default
        cur, used = [], 0
        for i in members:
            b = spec_of(theta0, names[i]).numel() * 4
            if cur and used + b > budget:
                stacks.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += b
        stacks.append(cur)
    return [[names[i] for i in stack] for stack in sorted(stacks)]


def _sketch_generators(names: list[str], seed: int) -> list[torch.Generator]:
    """One sketch generator per matrix, seeded by the matrix's name: it draws θ_0's sketch first
    and Δ's second (as ``rank_contrast``)."""
    return [torch.Generator(device="cpu").manual_seed(_matrix_seed(seed, k)) for k in names]


def _spectrum_options(settings: LarvSettings) -> SpectrumOptions:
    return SpectrumOptions(settings.spectrum, settings.rank, settings.oversample,
                           settings.spectrum_tail)  # fmt: skip


def _open_theta0_stats(
    theta0: StateDict, names: list[str], settings: LarvSettings, stats: Theta0Stats | None
) -> Theta0Stats:
    """θ_0's statistics to read and fill: the caller's (checked against the settings), else the
    disk cache's entry for θ_0's content (``settings.stats_cache_dir``), else an empty set."""
    if stats is not None:
        stats.check(settings)
        return stats
    stats = Theta0Stats.empty(settings)
    if settings.stats_cache_dir is not None and names:
        key = content_key(theta0, names, settings)
        stats = load_stats(settings.stats_cache_dir, key, settings) or stats
        stats.key = key
    return stats


def _diagnosed_matrices(theta0: StateDict, groups: LayerGroups) -> list[list[str]]:
    """The names of each block's matrices: its floating tensors with two or more dimensions
    (biases and norms are scaled but never enter the diagnostics)."""
    return [
        [n for n in members if spec_of(theta0, n).ndim >= 2 and _is_float(spec_of(theta0, n))]
        for members in groups.members
    ]


def layer_diagnostics(
    theta0: StateDict,
    delta: _LazyDelta,
    groups: LayerGroups,
    settings: LarvSettings,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    stats: Theta0Stats | None = None,
    *,
    batch_bytes: int | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """Mean e and mean c over each block's 2-D (or folded conv) weight matrices (docs/method.md, "Layers"),
    from :func:`matrix_diagnostics`, and the number of matrices of each block."""
    mats = _diagnosed_matrices(theta0, groups)
    all_mats = [n for names in mats for n in names]
    e_mat, c_mat = matrix_diagnostics(theta0, delta, all_mats, settings, device, progress, stats,
                                      batch_bytes=batch_bytes)  # fmt: skip
    e_layers, c_layers, counts = [], [], []
    for names in mats:
        e_vals, c_vals = [e_mat[n] for n in names], [c_mat[n] for n in names]
        counts.append(len(e_vals))
        e_layers.append(sum(e_vals) / len(e_vals) if e_vals else 0.0)
        c_layers.append(sum(c_vals) / len(c_vals) if c_vals else 0.0)
    return e_layers, c_layers, counts


def matrix_diagnostics(
    theta0: StateDict,
    delta: _LazyDelta,
    names: list[str],
    settings: LarvSettings,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    stats: Theta0Stats | None = None,
    *,
    batch_bytes: int | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """e and c of each named matrix, by name.

    Same-shaped matrices are stacked (:func:`shape_batches`, at most ``batch_bytes`` of θ_0 per
    stack) and each stack goes through one batched call of
    :func:`~.diagnostics.theta0_statistics` (where θ_0's statistics are not known yet) and of
    :func:`~.diagnostics.pair_diagnostics` on ``device`` (default: where θ_0 lives); Δ is formed
    one stack at a time. The values do not depend on the stacking: each matrix's spectrum,
    commutator and (randomized) sketch are its own. θ_0's statistics come from ``stats`` where it
    has them, else from the disk cache (``settings.stats_cache_dir``), else they are computed here
    once (and saved to the cache, or added to ``stats`` when the caller passed one).
    """
    cache_dir = settings.stats_cache_dir
    keep_grams = stats is not None or cache_dir is not None  # the statistics outlive this call
    stats = _open_theta0_stats(theta0, names, settings, stats)
    known = len(stats)
    options = _spectrum_options(settings)
    randomized = settings.spectrum == "randomized"

    e_mat: dict[str, float] = {}
    c_mat: dict[str, float] = {}
    # progress=None: a bar appears only when the diagnostics take more than a moment (tqdm delay)
    bar = tqdm(total=len(names), desc="LARV diagnostics", unit="matrix", leave=False,
               disable=progress is False, delay=0 if progress else 1.5)  # fmt: skip
    with torch.no_grad():
        for stack in shape_batches(names, theta0, delta, device, batch_bytes):
            first = spec_of(theta0, stack[0])
            dev = device if device is not None else first.device
            # each θ_0 matrix read once, straight into its slice: a streamed θ_0 holds one stack
            x = torch.empty((len(stack), *matrix_shape(first)), dtype=first.dtype, device=dev)
            for i, k in enumerate(stack):
                x[i].copy_(as_matrix(theta0[k].detach()))
            y = delta.stack(stack, tuple(x.shape[-2:]), dev, theta0=x)
            gens = _sketch_generators(stack, settings.seed) if randomized else None
            if all(k in stats for k in stack):
                x_stats = stats.stacked(stack, dev)
                if gens is not None:
                    skip_theta0_sketches(gens, x, options)
            else:  # θ_0's statistics, once per run (or per cache)
                x_stats = theta0_statistics(x, options, gens)
                stats.store(stack, x_stats, grams=keep_grams)
            e, c = pair_diagnostics(x, y, x_stats, options, settings.eps, gens)
            e_mat.update(zip(stack, e.tolist(), strict=True))
            c_mat.update(zip(stack, c.tolist(), strict=True))
            del x, y, x_stats, e, c  # before the next stack is formed
            bar.update(len(stack))
    bar.close()
    if cache_dir is not None and len(stats) > known and stats.key is not None:
        save_stats(cache_dir, stats)  # something was computed: a miss, or a partial entry
    return e_mat, c_mat


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dtype=torch.float64).square()


def _zero_everywhere(theta0: StateDict, delta: _LazyDelta, e_layers: list[float]) -> bool:
    """Whether every parameter's update is zero (``is_zero_update``). A layer with e > 0 has a
    non-zero update, which settles it without another pass over the model."""
    if any(v != 0.0 for v in e_layers):
        return False
    return all(bool(is_zero_update(_sq_norm(delta[k]), _sq_norm(theta0[k]))) for k in delta)


def _gate(
    e: list[float], c: list[float], settings: LarvSettings
) -> tuple[list[float], list[float], tuple | None, float | None]:
    """:func:`gate_scores` plus the normalizer the continuous gate divided w by (None: none)."""
    w = composite_score(
        e, c, settings.eta, settings.rho, settings.zeta,
        settings.use_info, settings.use_depth_prior, settings.use_conflict,
    )  # fmt: skip
    out = apply_gate(w, settings)
    return w, out.scales, out.thresholds, out.normalizer


def gate_scores(
    e: list[float], c: list[float], settings: LarvSettings
) -> tuple[list[float], list[float], tuple | None]:
    """Composite score w and scale s per layer for the configured gate (with ``gate:
    continuous``, w divided by its median first under ``w_normalize: median``; w itself is
    returned as computed), and the tiered gate's thresholds (else None)."""
    w, s, thresholds, _ = _gate(e, c, settings)
    return w, s, thresholds


def compute_larv_scales(
    theta0: StateDict,
    merged: StateDict,
    settings: LarvSettings,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    theta0_stats: Theta0Stats | None = None,
    task: str | None = None,
    *,
    batch_bytes: int | None = None,
) -> LarvResult:
    """Diagnostics of Δθ = θ_merged − θ_0 and the per-layer scales (docs/method.md, "Pipeline" 2–4).

    Raises :class:`~fusion_bench_larv.errors.LarvInputError` when θ_0 and the merged model
    differ in keys or shapes or hold NaN/Inf, and its subclass ``LarvLayerError`` when fewer than
    two transformer blocks are found. Any dtype works: diagnostics run in float32 or wider.

    ``theta0_stats``: θ_0's per-matrix statistics to reuse (and to fill where missing), e.g. one
    :class:`~fusion_bench_larv.core.stats_cache.Theta0Stats` shared by a sweep over mergers in one
    process; ``settings.stats_cache_dir`` keeps them on disk instead.

    ``task``: the name of a fine-tuned model passed as ``merged`` (:func:`compute_per_task_scales`),
    so that errors and warnings speak of that model and its task vector; the values are the same.

    ``batch_bytes``: the most bytes of θ_0 per stack of same-shaped matrices (:func:`shape_batches`;
    default ``min(BATCH_BYTES, θ_0 / BATCH_FRACTION)``); memory only, the values are the same.
    """
    start = time.perf_counter()
    try:
        check_same_keys_and_shapes(theta0, merged)
    except LarvInputError as err:
        if task is None:
            raise
        raise LarvInputError(f"fine-tuned model `{task}`: {err}") from err
    check_finite(theta0, "θ_0 (the pretrained model)")
    check_finite(merged, "the merged model (the base method's output)" if task is None
                 else f"model `{task}`")  # fmt: skip
    names = _float_names(theta0)
    groups = grouped_layers(names, settings.layer_pattern)
    delta = _LazyDelta(theta0, merged, names)  # streamed: never a full copy of Δθ
    e, c, counts = layer_diagnostics(
        theta0, delta, groups, settings, device, progress, theta0_stats, batch_bytes=batch_bytes
    )
    warnings = []
    if _zero_everywhere(theta0, delta, e):
        update = "the merged update θ_merged − θ_0" if task is None else "its task vector"
        warnings.append(f"{update} is zero everywhere; e = 0 in every layer")
    w, s, thresholds, normalizer = _gate(e, c, settings)
    if normalizer is not None and not median(w) > 0:
        warnings.append(
            f"`w_normalize: {settings.w_normalize}`: the median of w over the layers is "
            f"{median(w)!r}, not > 0; the continuous gate read w as it is (normalizer 1.0)"
        )
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
                sum(spec_of(theta0, n).numel() for n in members),
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
                      time.perf_counter() - start, warnings, normalizer)  # fmt: skip


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_over_tasks(tasks: dict[str, LarvResult], seconds: float = 0.0) -> LarvResult:
    """One summary of per-task results (same blocks): e, c, w, s of each block, the scale of
    every parameter and of every outside parameter, each the arithmetic mean over the tasks in
    order; r, prefixes and counts as they are. ``thresholds`` and ``w_normalizer`` are None (each
    task has its own); the warnings are every task's, prefixed with its name; ``tasks`` holds the
    results themselves. The mean scales are a summary: no parameter is ever multiplied by them."""
    if not tasks:
        raise LarvInputError("per-task diagnostics need at least one fine-tuned model; got none")
    results = list(tasks.values())
    first = results[0]
    layers = [
        dataclasses.replace(
            rec,
            **{k: _mean([getattr(r.layers[i], k) for r in results]) for k in ("e", "c", "w", "s")},
        )
        for i, rec in enumerate(first.layers)
    ]
    param_scale = {k: _mean([r.param_scale[k] for r in results]) for k in first.param_scale}
    outside = [
        {**item, "scale": param_scale[item["name"]]} for item in first.outside
    ]  # the same names and anchors for every task: they depend on θ_0's names only
    warnings = [f"task `{t}`: {msg}" for t, r in tasks.items() for msg in r.warnings]
    return LarvResult(layers, outside, param_scale, None, first.layer_pattern, seconds,
                      warnings, None, dict(tasks))  # fmt: skip


def compute_per_task_scales(
    theta0: StateDict,
    tasks: Iterable[tuple[str, StateDict]],
    settings: LarvSettings,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    theta0_stats: Theta0Stats | None = None,
) -> LarvResult:
    """Per-task diagnostics (docs/method.md, "Per-task diagnostics"): for every fine-tuned model
    θ_t, the scales s_ℓ,t that :func:`compute_larv_scales` gives on θ_0 and θ_t alone, i.e. with
    A_Δ taken from τ_t = θ_t − θ_0, and the gate applied over that task's own L blocks.

    ``tasks``: (name, state dict) pairs, consumed one at a time, so a caller can load each model
    just before its pass and drop it after. θ_0's statistics are computed once and shared by every
    task (from ``theta0_stats``, else the disk cache ``settings.stats_cache_dir``, else here).

    Returns :func:`mean_over_tasks` of the per-task results: ``result.tasks[t].param_scale`` is
    what multiplies τ_t; the top-level fields are means over the tasks, for the report only.
    """
    start = time.perf_counter()
    if theta0_stats is None:
        names = _float_names(theta0)
        groups = grouped_layers(names, settings.layer_pattern)
        mats = [n for block in _diagnosed_matrices(theta0, groups) for n in block]
        theta0_stats = _open_theta0_stats(theta0, mats, settings, None)
    results = {}
    for name, state in tasks:
        if name in results:
            raise LarvInputError(f"task `{name}` is listed twice; every task needs its own name")
        results[name] = compute_larv_scales(
            theta0, state, settings, device, progress, theta0_stats, task=name
        )
    return mean_over_tasks(results, time.perf_counter() - start)


@torch.no_grad()
def apply_scales(
    theta0: StateDict, merged: Mapping[str, torch.Tensor], param_scale: Mapping[str, float]
) -> None:
    """In place: merged[k] ← θ_0[k] + s_k·(merged[k] − θ_0[k]).

    A scale of exactly 1 leaves the tensor untouched, so unit scales reproduce the base merger
    bit for bit. Low-precision tensors are combined in float32 and cast back to their dtype.
    A tensor tied under several names is updated once, with the first of its names' scales.
    A name missing from either side, a shape mismatch, a non-floating tensor or a non-finite
    scale is a ``LarvInputError``, raised before any tensor is changed.
    """
    check_scales(theta0, merged, param_scale)
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
