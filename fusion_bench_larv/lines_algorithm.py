"""LiNeS over any FusionBench task-vector merger (``method=lines`` / ``lines_ta`` /
``lines_ties``): the thin adapter around :mod:`.lines` (docs/method.md, "LiNeS (faithful)").

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
   θ_0 + λ·τ_MTV in place (:func:`.veneer.apply_scales`).

β is a hyperparameter the authors choose on validation data: either given (``beta``) or chosen
on held-out labelled data (``validation: {taskpool, grid}``, :mod:`.selection`): the base merge
runs once, every β of the grid rescales a copy of τ_MTV, the validation task pool scores each, and
the best (the first among equals) is applied; the grid, the scores and the choice go into the
report.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from copy import deepcopy
from typing import Any

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin
from omegaconf import OmegaConf
from torch import nn

from .base_method import (
    FUSION_BENCH_META_KEYS,
    base_method_name,
    base_method_report,
    build_base_method,
    check_base_method,
    merged_module,
    report_file,
    rng_kept,
    run_base_method,
    write_report,
)
from .lines import l1_norm, lines_alpha_from_norms, lines_param_scales, sum_task_vectors
from .selection import (
    build_taskpool,
    check_validation,
    choose,
    taskpool_report,
    validation_score,
)
from .settings import LarvConfigError
from .validation import (
    LarvInputError,
    LarvWarning,
    check_finite,
    grouped_layers,
    unknown_keys_message,
)
from .veneer import apply_scales

__all__ = ["LiNeSAlgorithm"]

log = logging.getLogger(__name__)

# the β grids of the authors' validation sweeps (wang-kee/LiNeS, src/eval/eval.py,
# evaluate_task_vector), quoted in the error when β is missing
_AUTHORS_BETA_GRIDS = "Task Arithmetic 0.1, 0.2, …, 1.0; TIES 0.1, 0.2, …, 1.5"
_LINES_KEYS = ("base_method", "beta", "validation", "layer_pattern", "report_name", "report_dir")
# base-merger keys that are a global coefficient LiNeS replaces
_COEFFICIENT_KEYS = ("scaling_factor",)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class LiNeSAlgorithm(BaseAlgorithm, LightningFabricMixin):
    """LiNeS (Wang et al., ICLR 2025) over any task-vector merger.

    Args:
        base_method: the wrapped merger, a FusionBench method config with ``_target_`` or a built
            ``BaseAlgorithm``; run it with global coefficient 1 (see the module docstring).
        beta: β ≥ 0, the increase of λ from the first block to the last; or null with
            ``validation``.
        validation: null, or ``{taskpool: <task pool config on held-out labelled data>, grid:
            [β values]}``: β is chosen on that task pool (:mod:`.selection`).
        layer_pattern: null (auto-detect, as LARV) or a regex whose group ``(?P<idx>\\d+)``
            captures the block index.
        report_name: file name of the per-block report (default ``lines_layers.json``).
        report_dir: where it goes; default the program's log dir; without either it is kept in
            ``self.last_report`` only.
    """

    _config_mapping = BaseAlgorithm._config_mapping | {k: k for k in _LINES_KEYS}

    def __init__(
        self,
        base_method: Any = None,
        beta: float | None = None,
        validation: Any = None,
        layer_pattern: str | None = None,
        report_name: str = "lines_layers.json",
        report_dir: str | None = None,
        **kwargs: Any,
    ):
        meta = {k: kwargs.pop(k) for k in FUSION_BENCH_META_KEYS if k in kwargs}
        if kwargs:  # Hydra hands every composed key over: a typo fails here, with a suggestion
            raise LarvConfigError(unknown_keys_message(kwargs, _LINES_KEYS, "LiNeS method config"))
        check_base_method(base_method)
        self.validation = check_validation(validation, "LiNeS", "β")
        if beta is None and self.validation is None:
            raise LarvConfigError(
                "LiNeS needs `beta` (method.beta=<number> on the command line): the increase of "
                "the scale from the first block to the last, λ_ℓ = α + β·ℓ/(L−1); or "
                "`validation: {taskpool: ..., grid: [...]}` to choose it on held-out labelled "
                f"data, as the authors do (their grids: {_AUTHORS_BETA_GRIDS})"
            )
        if beta is not None and self.validation is not None:
            raise LarvConfigError(
                "LiNeS config: give `beta` or `validation` (which chooses β), not both"
            )
        if beta is None:
            beta = self.validation[1][0]  # replaced by the choice in run()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            raise LarvConfigError(f"LiNeS config `beta` = {beta!r} is not allowed: a finite number")
        if beta < 0:
            raise LarvConfigError(
                f"LiNeS config `beta` = {beta!r} is not allowed: β ≥ 0 (LiNeS scales deeper "
                "blocks more, never less)"
            )
        if layer_pattern is not None and not isinstance(layer_pattern, str):
            raise LarvConfigError(
                f"LiNeS config `layer_pattern` = {layer_pattern!r} is not allowed: null or a regex"
            )
        if not isinstance(report_name, str) or not report_name or os.sep in report_name:
            raise LarvConfigError(
                f"LiNeS config `report_name` = {report_name!r} is not allowed: a plain file name"
            )
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise LarvConfigError(
                f"LiNeS config `report_dir` = {report_dir!r} is not allowed: null or a directory"
            )
        self.base_method = base_method
        self.beta = float(beta)
        self.layer_pattern = layer_pattern
        self.report_name = report_name
        self.report_dir = None if report_dir is None else os.fspath(report_dir)
        self.last_report: dict | None = None
        super().__init__(**meta)

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
                    f"LiNeS: the base merger's `{key}` is {c}, not 1. LiNeS replaces the global "
                    f"coefficient: it cancels out of α·τ_MTV but scales the depth ramp, which "
                    f"acts as β = {c}·{self.beta}; set method.base_method.{key}=1.0 for LiNeS as "
                    "its authors run it"
                )
        return None

    def run(
        self, modelpool: BaseModelPool | Mapping[str, nn.Module], base_merge: Any = None
    ) -> Any:
        """Run the base merger and rescale its merged task vector block by block; returns what
        the base merger returned (its merged model modified in place).

        ``base_merge``: the base merger's output for this same model pool and base config,
        computed earlier; a copy of it is rescaled instead of running the merger again (the
        caller vouches that the configs match, as with :meth:`LARVAlgorithm.run`)."""
        if not isinstance(modelpool, BaseModelPool):
            if not isinstance(modelpool, Mapping):
                raise LarvInputError(
                    "LiNeS needs a FusionBench model pool or a mapping name -> model, got "
                    f"{type(modelpool).__name__}"
                )
            modelpool = BaseModelPool(dict(modelpool))
        if not modelpool.has_pretrained:
            raise LarvInputError(
                "LiNeS needs the pretrained model θ_0, but the model pool has no `_pretrained_` "
                f"entry (models: {modelpool.all_model_names})"
            )
        tasks = list(modelpool.model_names)
        if not tasks:
            raise LarvInputError("LiNeS needs at least one fine-tuned model; the pool has none")
        msg = self._coefficient_warning()
        if msg:
            log.warning(msg)
            warnings.warn(msg, LarvWarning, stacklevel=2)

        # loading must not move the RNG the base merger draws from (rng_kept), as under LARV
        with rng_kept():
            pretrained = modelpool.load_pretrained_model()
            check_finite(pretrained.state_dict(), "model `_pretrained_`")
            architecture = type(pretrained).__name__
            theta0 = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
            del pretrained
            names = [k for k, v in theta0.items() if v.is_floating_point()]
            groups = grouped_layers(names, self.layer_pattern)  # before the (long) merge

            def task_vectors():
                for task in tasks:
                    sd = modelpool.load_model(task).state_dict()
                    check_finite(sd, f"model `{task}`")
                    missing = [k for k in names if k not in sd]
                    if missing:
                        raise LarvInputError(
                            f"model `{task}` lacks parameters of θ_0: {missing[:5]}"
                        )
                    yield {
                        k: sd[k].to(_compute_dtype(theta0[k]))
                        - theta0[k].to(_compute_dtype(theta0[k]))
                        for k in names
                    }

            summed, count = sum_task_vectors(task_vectors())
            sum_l1 = l1_norm(summed.values())
            del summed

        merger = base_method_name(self.base_method)
        if base_merge is None:
            base = build_base_method(self.base_method, self._program, self._fabric_instance)
            out = run_base_method(base, modelpool)
        else:
            out = deepcopy(base_merge)
        merged = merged_module(out, merger, theta0, architecture)
        state = merged.state_dict()
        with torch.no_grad():
            check_finite(state, f"the output of {merger}")
            merged_l1 = l1_norm(
                state[k].to(_compute_dtype(theta0[k])) - theta0[k].to(_compute_dtype(theta0[k]))
                for k in names
            )
            try:
                alpha = lines_alpha_from_norms(sum_l1, merged_l1, count)
            except ValueError as err:
                raise LarvInputError(f"{err} ({merger})") from err
            chosen = None
            if self.validation is not None:
                chosen = self._choose_beta(merged, theta0, state, names, groups, alpha)
                self.beta = chosen["beta"]
            param_scale, lambdas = lines_param_scales(names, groups, alpha, self.beta)
            apply_scales(theta0, state, param_scale)
        log.info("LiNeS: α = %.6g, β = %.6g, λ per block %s", alpha, self.beta,
                 [round(x, 4) for x in lambdas])  # fmt: skip

        outside = [n for n in names if n in groups.outside]
        self.last_report = {
            "method": "LiNeS",
            "base_method": base_method_report(self.base_method),
            "base_merge": "computed" if base_merge is None else "reused",
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
            "outside_blocks": {"scale": alpha, "parameters": outside},
        }
        if chosen is not None:
            self.last_report["validation"] = chosen
        self._write_report(self.last_report)
        return out

    def _choose_beta(self, merged, theta0, state, names, groups, alpha) -> dict:
        """Every β of the validation grid applied to a copy of τ_MTV and scored on the
        validation task pool; ``state`` is left as the base merger made it."""
        taskpool_cfg, grid = self.validation
        pool = build_taskpool(taskpool_cfg)
        kept = {k: state[k].clone() for k in names}
        scores = []
        for beta in grid:
            scales, _ = lines_param_scales(names, groups, alpha, beta)
            apply_scales(theta0, state, scales)
            scores.append(validation_score(pool.evaluate(merged)))
            log.info("LiNeS: β = %g scores %.4f on validation", beta, scores[-1])
            for k in names:
                state[k].copy_(kept[k])
        best = choose(scores)
        return {
            "parameter": "beta",
            "grid": list(grid),
            "scores": scores,
            "beta": grid[best],
            "taskpool": taskpool_report(taskpool_cfg),
        }

    def report_path(self) -> str | None:
        return report_file(self.report_dir, self._program, self.report_name)

    def _write_report(self, report: dict) -> None:
        write_report(report, self.report_path(), "LiNeS")
