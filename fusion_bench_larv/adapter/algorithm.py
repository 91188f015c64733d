"""LARV as a FusionBench method: the wrapper skeleton (:mod:`.wrapper`) with LARV's settings and
scales (docs/method.md, "Pipeline"); guarded LARV is the same class with ``validation``, which
chooses the tiered spread δ (docs/method.md, "Guarded LARV"). The two placements that run the
base merger again on rescaled task vectors (``placement: task_vectors``, ``diagnostics:
per_task``) are the one path of their own."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from omegaconf import OmegaConf
from torch import nn

from ..core.inputs import check_finite
from ..core.keys import did_you_mean
from ..core.settings import LarvSettings
from ..core.veneer import LarvResult, compute_larv_scales, compute_per_task_scales
from ..errors import LarvAttributeError, LarvConfigError, LarvInputError
from .base_method import rng_kept
from .model_state import is_lazy, state_copy
from .pool_view import PoolView
from .wrapper import MergeContext, UpdateRescaler

__all__ = ["LARV_KEYS", "LARVAlgorithm"]

log = logging.getLogger(__name__)

LARV_KEYS = LarvSettings.keys()


def _plain(value: Any) -> Any:
    """An OmegaConf value (Hydra hands lists over as ListConfig) as plain Python data."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _base_option(base_method: Any, key: str) -> Any:
    """One option of the wrapped merger (its config's entry, or an instance's attribute)."""
    if isinstance(base_method, BaseAlgorithm):
        return getattr(base_method, key, None)
    return base_method.get(key) if isinstance(base_method, Mapping) else None


class _SettingKey:
    """``alg.<key>`` for one LARV key: read from ``alg.settings``, the only store of the LARV
    settings (so ``alg.config``, which FusionBench builds from attributes, and the report always
    agree). Writing builds new, checked settings: ``alg.gate = "continuous"`` is
    ``alg.settings = replace(alg.settings, gate="continuous")``, and a bad value raises
    :class:`LarvConfigError` and leaves the settings as they were."""

    def __init__(self, key: str):
        self.key = key

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.settings, self.key)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.settings = dataclasses.replace(obj.settings, **{self.key: _plain(value)})


@functools.cache
def _writable(cls: type) -> frozenset[str]:
    """The public attributes ``cls`` declares: its (and its bases') class attributes, properties,
    methods and LARV keys, and the instance attributes it annotates."""
    annotated = (n for c in cls.__mro__ for n in vars(c).get("__annotations__", {}))
    return frozenset(n for n in (*dir(cls), *annotated) if not n.startswith("_"))


class LARVAlgorithm(UpdateRescaler):
    """LARV over any task-vector merger.

    Args:
        base_method: the wrapped merger, a FusionBench method config with ``_target_`` (dict or
            DictConfig), or an already built ``BaseAlgorithm``.
        report_dir: where ``larv_layers.json`` goes; default: the program's log dir (next to
            FusionBench's report). Outside the CLI with no log dir nothing is written and the
            report is only kept in ``self.last_report``.
        validation: null (data-free, the default), or ``{taskpool: <task pool config on
            held-out labelled data>, grid: [δ values], grow, guard, uncovered}``
            (:mod:`.selection`): guarded LARV, the tiered spread δ (levels 1 − δ, 1, 1 + δ;
            0 ≤ δ ≤ 1; δ = 0 is the base merger bit for bit) chosen on that task pool (uses
            data). The guard is on unless ``guard: false``: the chosen δ is kept only when its
            validation gain over δ = 0 is significant, else the base merger.
        **larv: the LARV keys of :class:`LarvSettings` (``gate``, ``alpha``, …).

    The LARV settings are held once, in ``self.settings``; ``self.gate`` etc. read from it, and
    assigning one (``self.gate = "continuous"``) replaces ``self.settings`` with checked new
    settings (see :class:`_SettingKey`); ``self.settings`` itself is read-only.

    Only declared attributes can be written (see :meth:`__setattr__`): ``alg.gama = 3`` is a
    :class:`LarvAttributeError` with a suggestion, not a setting silently ignored.
    """

    method = "LARV"
    own_keys = LARV_KEYS
    chosen = ("delta", "δ")
    # levels 1 − δ, 1, 1 + δ stay ≥ 0; δ = 0 is the base merger bit for bit, and guarded LARV
    # keeps it unless a larger δ gains significantly on validation
    domain = (0.0, 1.0)
    base_value = 0.0
    guard_default = True
    _config_mapping = BaseAlgorithm._config_mapping | {
        "base_method": "base_method",
        "report_dir": "report_dir",
        "validation": "validation",
        **{k: k for k in LARV_KEYS},
    }
    # marks a LARV wrapper for `base_method.check_base_method`, which refuses LARV inside LARV
    # without importing this module
    _larv_wrapper_ = True
    settings: LarvSettings
    last_result: LarvResult | None

    def __setattr__(self, name: str, value: Any) -> None:
        """Write an attribute the class declares (see :func:`_writable`) or a private one (``_x``,
        as FusionBench's program and mixins set ``_program``, ``_fabric_instance``, ``_version_``
        …); anything else is a misspelling, refused with a suggestion. ``settings`` must be
        :class:`LarvSettings`."""
        cls = type(self)
        if not name.startswith("_") and name not in _writable(cls):
            data = [n for n in _writable(cls) if not callable(getattr(cls, n, None))]  # no methods
            raise LarvAttributeError(
                f"`{cls.__name__}.{name} = {value!r}` is refused: no such attribute"
                f"{did_you_mean(name, data)}. The LARV settings: {sorted(LARV_KEYS)} (e.g. "
                "`alg.gate = 'tiered'`)"
            )
        if name == "settings" and not isinstance(value, LarvSettings):
            raise LarvConfigError(
                f"`{cls.__name__}.settings` must be LarvSettings, got "
                f"{type(value).__name__}; set one key with `alg.<key> = ...`, or build settings "
                "with `LarvSettings.from_mapping({...})` or `dataclasses.replace(alg.settings, ...)`"
            )
        super().__setattr__(name, value)

    # -- what LARV states -------------------------------------------------------------------------
    def configure(self, **larv: Any) -> None:
        self.settings = LarvSettings.from_mapping({k: _plain(v) for k, v in larv.items()})
        self.last_result = None
        if self.settings.placement != "merged" and _base_option(self.base_method, "merge_backbone"):
            raise LarvConfigError(
                f"LARV `placement: {self.settings.placement}` rewrites the models the base merger "
                "loads from the pool, but with `merge_backbone: true` FusionBench's causal-LM "
                "mergers load the backbones from a pool of their own, which LARV does not see: "
                "use `placement: merged` (and `diagnostics: merged`), or `merge_backbone: false`"
            )
        if self.validation is None:
            return
        s = self.settings
        if s.gate != "tiered" or s.placement != "merged" or s.diagnostics != "merged":
            raise LarvConfigError(
                "LARV `validation` chooses the tiered gate's spread δ: it needs `gate: tiered`, "
                f"`placement: merged`, `diagnostics: merged` (got gate {s.gate!r}, placement "
                f"{s.placement!r}, diagnostics {s.diagnostics!r})"
            )

    @property
    def layer_pattern(self) -> str | None:
        return self.settings.layer_pattern

    @property
    def report_name(self) -> str:
        return self.settings.report_name

    def adopt(self, value: float) -> None:
        self.settings = dataclasses.replace(self.settings, levels=(1.0 - value, 1.0, 1.0 + value))

    def chosen_report(self, value: float) -> dict:
        return {"levels": list(self.settings.levels)}

    def scales(self, ctx: MergeContext, state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        result = compute_larv_scales(ctx.theta0, state, self.settings, device=self.device())
        log.info("LARV scales per layer: %s (diagnostics %.1f s)",
                 [round(x, 4) for x in result.scales], result.seconds)  # fmt: skip
        self.last_result = result
        return result.param_scale, self._report(result)

    def _report(self, result: LarvResult) -> dict:
        report = {
            "settings": self.settings.to_dict(),
            "base_method": self.base_method_report(),
            **result.to_dict(),
        }
        # wall-clock time is logged and kept in `last_result.seconds`, not in the file: the same
        # inputs and settings must give an identical larv_layers.json
        report.pop("diagnostics_seconds", None)
        return report

    # -- the placements that merge rescaled task vectors --------------------------------------------
    def run(
        self,
        modelpool: BaseModelPool | Mapping[str, nn.Module],
        base_merge: nn.Module | None = None,
    ) -> Any:
        """Merge with the base method, then rescale layer by layer (:meth:`UpdateRescaler.run`).

        ``base_merge`` is reused only with ``placement: merged``, where the base merge does not
        depend on the LARV settings. Every input problem is a :class:`LarvInputError` raised
        before anything is written: no ``_pretrained_``, NaN/Inf in any model (checked as it is
        loaded), θ_0 and the merged model differing in keys or shapes, fewer than two layers."""
        s = self.settings
        if s.placement == "merged":
            return super().run(modelpool, base_merge)
        ctx = self.open(modelpool)
        if base_merge is not None:
            raise LarvConfigError(
                "a precomputed `base_merge` cannot be reused with `diagnostics: per_task`: "
                "the base merger must run on the task vectors rescaled by their own scales; "
                "drop `base_merge`, or use `diagnostics: merged` with `placement: merged`"
                if s.diagnostics == "per_task"
                else "a precomputed `base_merge` can only be reused with `placement: merged`; "
                f"with placement {s.placement!r} the base merger must run on the rescaled models"
            )
        if s.diagnostics == "per_task":
            result = self._per_task_scales(ctx)
            scales = {task: res.param_scale for task, res in (result.tasks or {}).items()}
            report = self._report(result)
        else:
            # the view gives the merger fresh copies of in-memory models: it runs twice
            view = PoolView(ctx.pool, copy_instances=ctx.pool.has_instance_models,
                            checked=ctx.checked)  # fmt: skip
            out = self.run_base(ctx, view)
            merged = self.merged_of(ctx, out)
            scales, report = self.scales(ctx, merged.state_dict())
            self.warn(report["warnings"])
            del out, merged
        out = self.run_base(ctx, PoolView(ctx.pool, ctx.theta0, scales, checked=ctx.checked))
        self.merged_of(ctx, out)  # one model of θ_0's kind (repaired, for a lazy pool)
        return self.finish(out, report, ctx)

    def _per_task_scales(self, ctx: MergeContext) -> LarvResult:
        """``diagnostics: per_task`` (docs/method.md, "Per-task diagnostics"): every task vector
        gets its own scales from its own diagnostics; each fine-tuned model is loaded twice, once
        here (then dropped), once by the merger."""
        result = compute_per_task_scales(
            ctx.theta0, self._task_models(ctx), self.settings, device=self.device()
        )
        for task, res in (result.tasks or {}).items():
            log.info("LARV scales per layer, task %s: %s", task, [round(x, 4) for x in res.scales])
        log.info("LARV per-task diagnostics: %d tasks, %.1f s", len(result.tasks or {}),
                 result.seconds)  # fmt: skip
        self.warn(result.warnings, stacklevel=4)  # warn, _per_task_scales, run, the caller
        self.last_result = result
        return result

    @staticmethod
    def _task_models(ctx: MergeContext):
        """(name, state dict) of each fine-tuned model (the pool's ``model_names``), loaded one at
        a time, checked for NaN/Inf, and never modified."""
        names = ctx.pool.model_names
        if not names:
            raise LarvInputError(
                "`diagnostics: per_task` needs fine-tuned models, but the model pool has none "
                f"besides `_pretrained_` (models: {ctx.pool.all_model_names})"
            )
        for name in names:
            # the same RNG rule as for θ_0: loading must not move the base merger's draws
            with rng_kept():
                model = ctx.pool.load_model(name)
                # a lazy model: read once into memory, under θ_0's names (a tied head included)
                state = state_copy(model) if is_lazy(model) else model.state_dict()
                del model
            if name not in ctx.checked:
                check_finite(state, f"model `{name}`")
                ctx.checked.add(name)
            yield name, state
            del state


for _key in LARV_KEYS:
    setattr(LARVAlgorithm, _key, _SettingKey(_key))
del _key
