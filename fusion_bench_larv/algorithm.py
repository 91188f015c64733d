"""The FusionBench adapter: one generic `BaseAlgorithm` that runs any base merger exactly as
FusionBench would and puts LARV's layer-wise rescaling on top (docs/method.md, "Pipeline").

What it delegates: the base merger's config check, construction and run to
:mod:`.base_method`, the model pool the merger sees to :mod:`.pool_view`, the maths to
:mod:`.veneer`, the report file to :mod:`.io`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
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
from .guarded import check_guarded, run_guarded
from .pool_view import PoolView, in_memory_model
from .selection import check_validation
from .settings import LarvAttributeError, LarvConfigError, LarvSettings
from .validation import (
    LarvInputError,
    LarvWarning,
    check_finite,
    did_you_mean,
    grouped_layers,
    unknown_keys_message,
)
from .veneer import LarvResult, apply_scales, compute_larv_scales, compute_per_task_scales

__all__ = ["LARV_KEYS", "LARVAlgorithm"]

log = logging.getLogger(__name__)

LARV_KEYS = LarvSettings.keys()


def _plain(value: Any) -> Any:
    """An OmegaConf value (Hydra hands lists over as ListConfig) as plain Python data."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


class _SettingKey:
    """``alg.<key>`` for one LARV key: read from ``alg.settings``, the only store of the LARV
    settings (so ``alg.config``, which FusionBench builds from attributes, and the report always
    agree). Writing builds new, validated settings: ``alg.gate = "continuous"`` is
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


def _warn(messages: list[str], stacklevel: int) -> None:
    """Each LARV warning to the log and as a :class:`LarvWarning`; ``stacklevel`` counts from
    here to the caller of ``LARVAlgorithm.run``, whom the warning names."""
    for msg in messages:
        log.warning("LARV: %s", msg)
        warnings.warn(msg, LarvWarning, stacklevel=stacklevel)


class LARVAlgorithm(BaseAlgorithm, LightningFabricMixin):
    """LARV over any task-vector merger.

    Args:
        base_method: the wrapped merger, a FusionBench method config with ``_target_`` (dict or
            DictConfig), or an already built ``BaseAlgorithm``.
        report_dir: where ``larv_layers.json`` goes; default: the program's log dir (next to
            FusionBench's report). Outside the CLI with no log dir nothing is written and the
            report is only kept in ``self.last_report``.
        validation: null (data-free, the default), or ``{taskpool: <task pool config on
            held-out labelled data>, grid: [δ values]}``: guarded LARV, the tiered spread δ
            chosen on that task pool (:mod:`.guarded`; uses data).
        **larv: the LARV keys of :class:`LarvSettings` (``gate``, ``alpha``, …).

    The LARV settings are held once, in ``self.settings``; ``self.gate`` etc. read from it, and
    assigning one (``self.gate = "continuous"``) replaces ``self.settings`` with validated new
    settings (see :class:`_SettingKey`); ``self.settings`` itself is read-only.

    Only declared attributes can be written (see :meth:`__setattr__`): ``alg.gama = 3`` is a
    :class:`LarvAttributeError` with a suggestion, not a setting silently ignored.
    """

    _config_mapping = BaseAlgorithm._config_mapping | {
        "base_method": "base_method",
        "report_dir": "report_dir",
        "validation": "validation",
        **{k: k for k in LARV_KEYS},
    }
    # marks a LARV wrapper for `base_method.check_base_method`, which refuses LARV inside LARV
    # without importing this module
    _larv_wrapper_ = True
    # the public instance attributes (any other public write is refused, see __setattr__)
    base_method: Any
    report_dir: str | None
    validation: tuple[Any, tuple[float, ...]] | None
    settings: LarvSettings
    last_report: dict | None
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

    def __init__(
        self,
        base_method: Any = None,
        report_dir: str | None = None,
        validation: Any = None,
        **larv: Any,
    ):
        meta = {k: larv.pop(k) for k in FUSION_BENCH_META_KEYS if k in larv}
        # Hydra hands every composed key over as a kwarg: a typo (`gama`) must fail here, first,
        # with a suggestion, before anything else is looked at
        unknown = set(larv) - set(LARV_KEYS)
        if unknown:
            raise LarvConfigError(
                unknown_keys_message(
                    unknown,
                    {*LARV_KEYS, "base_method", "report_dir", "validation"},
                    "LARV method config",
                )
            )
        check_base_method(base_method)
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise LarvConfigError(
                f"LARV config `report_dir` = {report_dir!r} is not allowed: null (the run's log "
                "dir) or a directory path"
            )
        self.base_method = base_method
        self.report_dir = None if report_dir is None else os.fspath(report_dir)
        self.settings = LarvSettings.from_mapping({k: _plain(v) for k, v in larv.items()})
        # guarded LARV (uses data; docs/method.md, "Guarded LARV"): δ chosen on validation
        self.validation = check_validation(validation, "LARV", "δ")
        if self.validation is not None:
            check_guarded(self.settings, self.validation[1])
        self.last_report: dict | None = None
        self.last_result: LarvResult | None = None
        super().__init__(**meta)

    # -- base merger --------------------------------------------------------------------------
    def build_base_method(self) -> BaseAlgorithm:
        """A fresh instance of the wrapped merger, set up the way FusionBench's program sets up a
        top-level method (nested methods would otherwise never get the program's Fabric)."""
        return build_base_method(self.base_method, self._program, self._fabric_instance)

    def _run_base(self, modelpool: BaseModelPool):
        return run_base_method(self.build_base_method(), modelpool)

    def _device(self) -> torch.device | None:
        return self._fabric_instance.device if self._fabric_instance is not None else None

    # -- run ------------------------------------------------------------------------------------
    def run(
        self,
        modelpool: BaseModelPool | Mapping[str, nn.Module],
        base_merge: nn.Module | None = None,
    ):
        """Merge with the base method, then rescale layer by layer.

        ``base_merge``: the base merger's output for this same model pool and base config,
        computed earlier (e.g. once for several gates in a sweep). A copy of it is rescaled and the
        base merger is not run again; only with ``placement: merged``, where the base merge does
        not depend on the LARV settings. The caller's module is left as it was.

        Every input problem is a :class:`LarvInputError` raised before anything is written (and,
        for in-memory models, before the base merger touches them): no ``_pretrained_``, NaN/Inf
        in any model (checked as it is loaded), θ_0 and the merged model differing in keys or
        shapes, fewer than two layers found.
        """
        if not isinstance(modelpool, BaseModelPool):
            if not isinstance(modelpool, Mapping):
                raise LarvInputError(
                    f"LARV needs a FusionBench model pool or a mapping name -> model, got "
                    f"{type(modelpool).__name__}"
                )
            modelpool = BaseModelPool(dict(modelpool))
        if not modelpool.has_pretrained:
            raise LarvInputError(
                "LARV needs the pretrained model θ_0, but the model pool has no `_pretrained_` "
                f"entry (models: {modelpool.all_model_names}). Add the base checkpoint under "
                "`_pretrained_` in the model pool config."
            )
        if self.validation is not None:
            return run_guarded(self, modelpool, base_merge)
        s = self.settings
        # in-memory models are checked up front, so a bad one stops the run before the base
        # merger has modified any of the caller's modules
        checked = set()
        for name in modelpool.all_model_names:
            obj = in_memory_model(modelpool, name)
            if obj is not None:
                check_finite(obj.state_dict(), f"model `{name}`")
                checked.add(name)
        # loading θ_0 must not move the RNG the base merger draws from (rng_kept)
        with rng_kept():
            pretrained = modelpool.load_pretrained_model()
            if "_pretrained_" not in checked:
                check_finite(pretrained.state_dict(), "model `_pretrained_`")
                checked.add("_pretrained_")
            architecture = type(pretrained).__name__
            # our own copy of θ_0: every base merger overwrites the pretrained model it loads
            theta0 = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
            del pretrained
        # the layer structure depends on θ_0's names only: a model LARV cannot split into blocks
        # is refused before the (possibly long) base merge
        grouped_layers([k for k, v in theta0.items() if v.is_floating_point()], s.layer_pattern)

        # what the merger returned must be one model of θ_0's architecture (not TALL's dict of
        # models, not EMR's modulated wrapper): a LarvInputError naming both, before any write
        merger = base_method_name(self.base_method)
        if s.diagnostics == "per_task":
            if base_merge is not None:
                raise LarvConfigError(
                    "a precomputed `base_merge` cannot be reused with `diagnostics: per_task`: "
                    "the base merger must run on the task vectors rescaled by their own scales; "
                    "drop `base_merge`, or use `diagnostics: merged` with `placement: merged`"
                )
            out, result = self._run_per_task(modelpool, theta0, checked, merger, architecture)
            return self._finish(out, result, reused=False)
        if base_merge is not None:
            if s.placement != "merged":
                raise LarvConfigError(
                    "a precomputed `base_merge` can only be reused with `placement: merged`; with "
                    f"placement {s.placement!r} the base merger must run on the rescaled models"
                )
            # checked for NaN/Inf with every merge in compute_larv_scales below
            out = deepcopy(merged_module(base_merge, merger, theta0, architecture))
        else:
            protect = s.placement == "task_vectors" and modelpool.has_instance_models
            # the view checks every model the base merger loads for NaN/Inf (fine-tuned
            # checkpoints)
            out = self._run_base(PoolView(modelpool, copy_instances=protect, checked=checked))
        merged = merged_module(out, merger, theta0, architecture)
        result = compute_larv_scales(theta0, merged.state_dict(), s, device=self._device())
        log.info("LARV scales per layer: %s (diagnostics %.1f s)",
                 [round(x, 4) for x in result.scales], result.seconds)  # fmt: skip
        _warn(result.warnings, stacklevel=3)  # _warn, run, run's caller

        if s.placement == "task_vectors":
            del out, merged
            out = self._run_base(PoolView(modelpool, theta0, result.param_scale, checked=checked))
            merged = merged_module(out, merger, theta0, architecture)
        else:
            apply_scales(theta0, merged.state_dict(), result.param_scale)

        return self._finish(out, result, reused=base_merge is not None)

    def _finish(self, out: Any, result: LarvResult, reused: bool) -> Any:
        self.last_result = result
        self.last_report = self._report(result)
        if reused:
            self.last_report["base_merge"] = "reused"  # the base merger was not run again here
        self._write_report(self.last_report)
        return out

    # -- diagnostics: per_task ------------------------------------------------------------------
    def _run_per_task(
        self,
        modelpool: BaseModelPool,
        theta0: dict[str, torch.Tensor],
        checked: set[str],
        merger: str,
        architecture: str,
    ) -> tuple[Any, LarvResult]:
        """``diagnostics: per_task`` (docs/method.md, "Per-task diagnostics"): every task vector
        gets its own scales from its own diagnostics, then the base merger runs once on the pool
        in which model t is θ_0 + s_ℓ,t·(θ_t − θ_0). Each fine-tuned model is loaded twice: once
        for its diagnostics (then dropped), once by the merger."""
        result = compute_per_task_scales(
            theta0, self._task_models(modelpool, checked), self.settings, device=self._device()
        )
        for task, res in (result.tasks or {}).items():
            log.info("LARV scales per layer, task %s: %s", task, [round(x, 4) for x in res.scales])
        log.info("LARV per-task diagnostics: %d tasks, %.1f s", len(result.tasks or {}),
                 result.seconds)  # fmt: skip
        _warn(result.warnings, stacklevel=4)  # _warn, _run_per_task, run, run's caller
        scales = {task: res.param_scale for task, res in (result.tasks or {}).items()}
        out = self._run_base(PoolView(modelpool, theta0, scales, checked=checked))
        merged_module(out, merger, theta0, architecture)  # one model of θ_0's architecture
        return out, result

    @staticmethod
    def _task_models(modelpool: BaseModelPool, checked: set[str]):
        """(name, state dict) of each fine-tuned model (the pool's ``model_names``), loaded one at
        a time, checked for NaN/Inf, and never modified."""
        names = modelpool.model_names
        if not names:
            raise LarvInputError(
                "`diagnostics: per_task` needs fine-tuned models, but the model pool has none "
                f"besides `_pretrained_` (models: {modelpool.all_model_names})"
            )
        for name in names:
            # the same RNG rule as for θ_0: loading must not move the base merger's draws
            with rng_kept():
                state = modelpool.load_model(name).state_dict()
            if name not in checked:
                check_finite(state, f"model `{name}`")
                checked.add(name)
            yield name, state
            del state

    # -- report ---------------------------------------------------------------------------------
    def _report(self, result: LarvResult) -> dict:
        report = {
            "settings": self.settings.to_dict(),
            "base_method": base_method_report(self.base_method),
            **result.to_dict(),
        }
        # wall-clock time is logged and kept in `last_result.seconds`, not in the file: the same
        # inputs and settings must give an identical larv_layers.json
        report.pop("diagnostics_seconds", None)
        return report

    def report_path(self) -> str | None:
        return report_file(self.report_dir, self._program, self.settings.report_name)

    def _write_report(self, report: dict) -> None:
        write_report(report, self.report_path(), "LARV")


for _key in LARV_KEYS:
    setattr(LARVAlgorithm, _key, _SettingKey(_key))
del _key
