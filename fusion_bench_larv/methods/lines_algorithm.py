"""LiNeS over any FusionBench task-vector merger (``method=lines`` / ``lines_ta`` /
``lines_ties``): the wrapper skeleton (:mod:`~fusion_bench_larv.adapter.wrapper`) with the maths of :mod:`.lines` (docs/method.md, "LiNeS (faithful)").

1. θ_0 is copied and T = the pool's fine-tuned models (``modelpool.model_names``); Σ_t τ_t is
   summed model by model, *before* the merge (mergers may overwrite the models they load).
2. The base merger runs as FusionBench would run it (:mod:`.base_method`); its output minus θ_0 is
   τ_MTV. LiNeS replaces the merger's global coefficient (the authors' ``apply_to(...,
   scaling_coef=1.0)``): run the merger with coefficient 1 (``lines_ta.yaml`` sets Task
   Arithmetic's ``scaling_factor: 1.0``, so τ_MTV = Σ_t τ_t, as ``wang-kee/LiNeS``'s ``sum``
   method). A coefficient c ≠ 1 left in the base config cancels out of α·τ_MTV but multiplies the
   β part: it acts as β' = c·β (logged as a warning).
3. α = ‖Σ_t τ_t‖₁ / (T·‖τ_MTV‖₁) over every floating-point entry of the state dict; block ℓ of
   L gets λ_ℓ = α + β·ℓ/(L − 1), everything outside the blocks α; the merged model becomes
   θ_0 + λ·τ_MTV in place (:func:`~fusion_bench_larv.core.veneer.apply_scales`).

β is a hyperparameter the authors choose on validation data: either given (``beta``) or chosen
on held-out labelled data (``validation: {taskpool, grid, grow, uncovered}``,
:mod:`~fusion_bench_larv.adapter.selection`): the base merge runs once, every β of the grid
rescales a copy of τ_MTV, the validation task pool scores each, the grid grows by its rule, and
the best (the first among equals) is applied; the grid searched, the scores and the choice go
into the report. LiNeS's β ≥ 0 (deeper blocks scaled more, never less) is a bound of the search.

:class:`SignedDepthRamp` is a labelled extension, not LiNeS: the same α and ramp with β of either
sign (``method=signed_depth_ramp``), so that a choice on validation may also shrink the deep
blocks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from omegaconf import OmegaConf

from ..adapter.base_method import rng_kept
from ..adapter.model_state import model_state
from ..adapter.wrapper import MergeContext, UpdateRescaler
from ..core.diagnostics import compute_dtype
from ..errors import LarvConfigError, LarvInputError
from .lines import l1_norm, lines_alpha_from_norms, lines_param_scales, sum_task_vectors

__all__ = ["LiNeSAlgorithm", "SignedDepthRamp"]

# the β grids of the authors' validation sweeps (wang-kee/LiNeS, src/eval/eval.py,
# evaluate_task_vector), quoted in the error when β is missing
_AUTHORS_BETA_GRIDS = "Task Arithmetic 0.1, 0.2, …, 1.0; TIES 0.1, 0.2, …, 1.5"
# base-merger keys that are a global coefficient LiNeS replaces
_COEFFICIENT_KEYS = ("scaling_factor",)


def _float_delta(state: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor], k: str):
    """state[k] − θ_0[k] in float32 (float64 for float64 weights); θ_0[k] read once (a streamed
    θ_0 reads it from disk)."""
    t0 = theta0[k]
    dtype = compute_dtype(t0.dtype)
    return state[k].to(dtype) - t0.to(dtype)


class LiNeSAlgorithm(UpdateRescaler):
    """LiNeS (Wang et al., ICLR 2025) over any task-vector merger.

    Args:
        base_method: the wrapped merger, a FusionBench method config with ``_target_`` or a built
            ``BaseAlgorithm``; run it with global coefficient 1 (see the module docstring).
        beta: β ≥ 0, the increase of λ from the first block to the last; or null with
            ``validation``.
        validation: null, or ``{taskpool: <task pool config on held-out labelled data>, grid:
            [β values], grow, uncovered}`` (:mod:`~fusion_bench_larv.adapter.selection`): β is
            chosen on that task pool.
        layer_pattern: null (auto-detect, as LARV) or a regex whose group ``(?P<idx>\\d+)``
            captures the block index.
        report_name: file name of the per-block report (default ``lines_layers.json``).
        report_dir: where it goes; default the program's log dir; without either it is kept in
            ``self.last_report`` only.
    """

    method = "LiNeS"
    own_keys = ("beta", "layer_pattern", "report_name")
    chosen = ("beta", "β")
    # β ≥ 0, as its authors define it; no β gives the base merger back (α rescales it), so
    # neither the guard nor `uncovered: base` applies
    domain = (0.0, None)
    _config_mapping = UpdateRescaler._config_mapping | {
        k: k for k in ("base_method", "validation", "report_dir", *own_keys)
    }

    def configure(
        self,
        beta: float | None = None,
        layer_pattern: str | None = None,
        report_name: str = "lines_layers.json",
    ) -> None:
        if beta is None and self.validation is None:
            raise LarvConfigError(
                f"{self.method} needs `beta` (method.beta=<number> on the command line): the increase of "
                "the scale from the first block to the last, λ_ℓ = α + β·ℓ/(L−1); or "
                "`validation: {taskpool: ..., grid: [...]}` to choose it on held-out labelled "
                f"data, as the authors do (their grids: {_AUTHORS_BETA_GRIDS})"
            )
        if beta is not None and self.validation is not None:
            raise LarvConfigError(
                f"{self.method} config: give `beta` or `validation` (which chooses β), not both"
            )
        if beta is None:
            beta = self.validation.grid[0]  # replaced by the choice in run()
        where = f"{self.method} config"
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            raise LarvConfigError(f"{where} `beta` = {beta!r} is not allowed: a finite number")
        if self.domain[0] is not None and beta < self.domain[0]:
            raise LarvConfigError(
                f"{where} `beta` = {beta!r} is not allowed: β ≥ 0 (LiNeS scales deeper "
                "blocks more, never less; β of either sign: method=signed_depth_ramp)"
            )
        if layer_pattern is not None and not isinstance(layer_pattern, str):
            raise LarvConfigError(
                f"{where} `layer_pattern` = {layer_pattern!r} is not allowed: null or a regex"
            )
        if not isinstance(report_name, str) or not report_name or os.sep in report_name:
            raise LarvConfigError(
                f"{where} `report_name` = {report_name!r} is not allowed: a plain file name"
            )
        self.beta = float(beta)
        self._layer_pattern = layer_pattern
        self._report_name = report_name

    def adopt(self, value: float) -> None:
        self.beta = float(value)

    def _coefficient_warning(self) -> str | None:
        """A warning when the base config sets a global coefficient other than 1."""
        cfg = self.base_method
        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            cfg = {k: getattr(cfg, k) for k in _COEFFICIENT_KEYS if hasattr(cfg, k)}
        for key in _COEFFICIENT_KEYS:
            c = cfg.get(key)
            if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 1:
                return (
                    f"the base merger's `{key}` is {c}, not 1. LiNeS replaces the global "
                    f"coefficient: it cancels out of α·τ_MTV but scales the depth ramp, which "
                    f"acts as β = {c}·{self.beta}; set method.base_method.{key}=1.0 for LiNeS as "
                    "its authors run it"
                )
        return None

    def prepare(self, ctx: MergeContext) -> tuple[float, int]:
        """(‖Σ_t τ_t‖₁, T), summed model by model before the merge (mergers may overwrite the
        models they load)."""
        tasks = list(ctx.pool.model_names)
        if not tasks:
            raise LarvInputError("LiNeS needs at least one fine-tuned model; the pool has none")
        msg = self._coefficient_warning()
        if msg:
            self.warn([msg], stacklevel=4)  # warn, prepare, run, the caller

        def task_vectors():
            for task in tasks:
                sd = model_state(ctx.pool.load_model(task))  # a lazy model: under θ_0's names
                ctx.check_task_model(task, sd)
                yield {k: _float_delta(sd, ctx.theta0, k) for k in ctx.names}

        # loading must not move the RNG the base merger draws from (rng_kept), as under LARV
        with rng_kept():
            summed, count = sum_task_vectors(task_vectors())
            sum_l1 = l1_norm(summed.values())
        return sum_l1, count

    def measure(self, ctx: MergeContext, state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """(‖τ_MTV‖₁, α) of the base merge: α does not depend on β."""
        sum_l1, count = ctx.prepared
        with torch.no_grad():
            merged_l1 = l1_norm(_float_delta(state, ctx.theta0, k) for k in ctx.names)
        try:
            return merged_l1, lines_alpha_from_norms(sum_l1, merged_l1, count)
        except ValueError as err:
            raise LarvInputError(f"{err} ({ctx.merger})") from err

    def scales(self, ctx: MergeContext, state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        sum_l1, count = ctx.prepared
        merged_l1, alpha = ctx.measured
        param_scale, lambdas = lines_param_scales(ctx.names, ctx.groups, alpha, self.beta)
        groups = ctx.groups
        report = {
            "method": self.method,
            "base_method": self.base_method_report(),
            "base_merge": "computed",
            "num_tasks": count,
            "l1_sum_task_vectors": sum_l1,
            "l1_merged_task_vector": merged_l1,
            "alpha": alpha,
            "beta": self.beta,
            "layer_pattern": groups.pattern,
            "num_blocks": groups.num_layers,
            "blocks": [
                {"block": i, "prefix": p, "lambda": lam}
                for i, (p, lam) in enumerate(zip(groups.prefixes, lambdas, strict=True))
            ],
            "outside_blocks": {
                "scale": alpha,
                "parameters": [n for n in ctx.names if n in groups.outside],
            },
        }
        return param_scale, report


class SignedDepthRamp(LiNeSAlgorithm):
    """A labelled extension of LiNeS, not LiNeS: the same λ_ℓ = α + β·ℓ/(L − 1) with LiNeS's α,
    but β of either sign (β < 0 shrinks the deeper blocks' share of the merged update), chosen on
    validation like LiNeS's (``method=signed_depth_ramp``; docs/method.md, "The signed depth
    ramp"). Everything else is :class:`LiNeSAlgorithm`'s."""

    method = "signed depth ramp"
    domain = (None, None)
