"""The FusionBench adapter: one generic `BaseAlgorithm` that runs any base merger exactly as
FusionBench would and puts LARV's layer-wise rescaling on top (spec, "Pipeline")."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from copy import deepcopy
from typing import Any

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .settings import LarvConfigError, LarvSettings
from .veneer import LarvResult, apply_scales, compute_larv_scales

log = logging.getLogger(__name__)

LARV_KEYS = tuple(k for k in LarvSettings.__dataclass_fields__ if k != "extra")


class _PoolView(BaseModelPool):
    """A view of a model pool that hands the base merger fresh copies instead of the caller's
    in-memory modules (FusionBench's mergers overwrite what they load), optionally with every
    loaded model rewritten as θ_0 + s_ℓ·(θ_i − θ_0) (``placement: task_vectors``)."""

    def __init__(
        self,
        inner: BaseModelPool,
        theta0: Mapping[str, torch.Tensor] | None = None,
        param_scale: Mapping[str, float] | None = None,
    ):
        self._inner = inner
        self._theta0 = theta0
        self._param_scale = param_scale
        super().__init__(
            models=dict.fromkeys(inner.all_model_names),
            train_datasets=inner._train_datasets,
            val_datasets=inner._val_datasets,
            test_datasets=inner._test_datasets,
        )

    def __getattr__(self, name: str) -> Any:  # processor, tokenizer, … of specialised pools
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def load_model(self, model_name_or_config, *args, **kwargs) -> nn.Module:
        model = self._inner.load_model(model_name_or_config, *args, **kwargs)
        if isinstance(model_name_or_config, str) and isinstance(
            self._inner._models.get(model_name_or_config), nn.Module
        ):
            model = deepcopy(model)
        if self._theta0 is not None and isinstance(model_name_or_config, str):
            with torch.no_grad():
                sd = model.state_dict()
                if model_name_or_config == "_pretrained_":
                    for k, v in self._theta0.items():
                        sd[k].copy_(v)
                else:
                    apply_scales(self._theta0, sd, self._param_scale)
        return model


class LARVAlgorithm(BaseAlgorithm, LightningFabricMixin):
    """LARV over any task-vector merger.

    Args:
        base_method: the wrapped merger, a FusionBench method config with ``_target_`` (dict or
            DictConfig), or an already built ``BaseAlgorithm``.
        report_dir: where ``larv_layers.json`` goes; default: the program's log dir (next to
            FusionBench's report). Outside the CLI with no log dir nothing is written and the
            report is only kept in ``self.last_report``.
        **larv: the LARV keys of :class:`LarvSettings` (``gate``, ``alpha``, …).
    """

    _config_mapping = BaseAlgorithm._config_mapping | {
        "base_method": "base_method",
        "report_dir": "report_dir",
        **{k: k for k in LARV_KEYS},
    }

    def __init__(self, base_method: Any, report_dir: str | None = None, **larv: Any):
        if base_method is None:
            raise LarvConfigError(
                "LARV needs `base_method`: a FusionBench method config with `_target_`"
            )
        if isinstance(base_method, Mapping) and "_target_" not in base_method:
            raise LarvConfigError(
                f"`base_method` must have a `_target_` (a FusionBench method class), got keys {list(base_method)}"
            )
        if not isinstance(base_method, (Mapping, BaseAlgorithm)):
            raise LarvConfigError(
                f"`base_method` must be a config mapping or a BaseAlgorithm, got {type(base_method)}"
            )
        self.base_method = base_method
        self.report_dir = report_dir
        larv = {
            k: (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v) for k, v in larv.items()
        }
        self.settings = LarvSettings.from_mapping(larv)
        for k in LARV_KEYS:
            setattr(self, k, getattr(self.settings, k))
        self.last_report: dict | None = None
        self.last_result: LarvResult | None = None
        super().__init__()

    # -- base merger --------------------------------------------------------------------------
    def build_base_method(self) -> BaseAlgorithm:
        """A fresh instance of the wrapped merger, set up the way FusionBench's program sets up a
        top-level method (nested methods would otherwise never get the program's Fabric)."""
        if isinstance(self.base_method, BaseAlgorithm):
            base = self.base_method
        else:
            cfg = self.base_method
            if not isinstance(cfg, DictConfig):
                cfg = OmegaConf.create(dict(cfg))
            base = instantiate(cfg, _recursive_=cfg.get("_recursive_", False))
        if hasattr(base, "_program"):
            base._program = self._program
        if self._fabric_instance is not None and hasattr(base, "_fabric_instance"):
            base._fabric_instance = self._fabric_instance
        return base

    def _run_base(self, modelpool: BaseModelPool):
        base = self.build_base_method()
        # no torch.no_grad() here: WUDI optimises with autograd inside its run()
        base.on_run_start()
        try:
            out = base.run(modelpool)
        finally:
            base.on_run_end()
        return out

    @staticmethod
    def _merged_module(out: Any) -> nn.Module:
        if isinstance(out, nn.Module):
            return out
        if isinstance(out, Mapping) and isinstance(out.get("merged"), nn.Module):
            return out["merged"]  # TSV-M with return_single_task_models
        raise TypeError(
            f"the base method returned {type(out).__name__}; LARV needs an nn.Module "
            "(or a dict with the merged model under 'merged')"
        )

    def _device(self) -> torch.device | None:
        return self._fabric_instance.device if self._fabric_instance is not None else None

    # -- run ------------------------------------------------------------------------------------
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]):
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        if not modelpool.has_pretrained:
            raise ValueError(
                "LARV needs the pretrained model θ_0, but the model pool has no `_pretrained_` "
                f"entry (models: {modelpool.all_model_names})"
            )
        s = self.settings
        with torch.no_grad():
            pretrained = modelpool.load_pretrained_model()
            # our own copy of θ_0: every base merger overwrites the pretrained model it loads
            theta0 = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
            del pretrained

        protect = s.placement == "task_vectors" and modelpool.has_instance_models
        out = self._run_base(_PoolView(modelpool) if protect else modelpool)
        merged = self._merged_module(out)
        result = compute_larv_scales(theta0, merged.state_dict(), s, device=self._device())
        log.info("LARV scales per layer: %s", [round(x, 4) for x in result.scales])

        if s.placement == "task_vectors":
            del out, merged
            out = self._run_base(_PoolView(modelpool, theta0, result.param_scale))
            merged = self._merged_module(out)
        else:
            apply_scales(theta0, merged.state_dict(), result.param_scale)

        self.last_result = result
        self.last_report = self._report(result)
        self._write_report(self.last_report)
        return out

    # -- report ---------------------------------------------------------------------------------
    def _report(self, result: LarvResult) -> dict:
        base_cfg = self.base_method
        if isinstance(base_cfg, BaseAlgorithm):
            base_cfg = {"_target_": f"{type(base_cfg).__module__}.{type(base_cfg).__qualname__}"}
        elif OmegaConf.is_config(base_cfg):
            base_cfg = OmegaConf.to_container(base_cfg, resolve=True)
        return {
            "settings": self.settings.to_dict(),
            "base_method": dict(base_cfg),
            **result.to_dict(),
        }

    def report_path(self) -> str | None:
        directory = self.report_dir
        if directory is None and self._program is not None:
            directory = getattr(self._program, "log_dir", None)
        return None if directory is None else os.path.join(directory, self.settings.report_name)

    def _write_report(self, report: dict) -> None:
        path = self.report_path()
        if path is None:
            log.info("LARV: no log dir; the per-layer report is kept in `last_report` only")
            return
        write_json_atomic(path, report)
        log.info("LARV per-layer report written to %s", path)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write to a temporary file in the same directory, then rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
