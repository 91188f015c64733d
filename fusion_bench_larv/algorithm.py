"""The FusionBench adapter: one generic `BaseAlgorithm` that runs any base merger exactly as
FusionBench would and puts LARV's layer-wise rescaling on top (spec, "Pipeline")."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import tempfile
import warnings
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
from .validation import (
    LarvInputError,
    LarvWarning,
    check_finite,
    did_you_mean,
    grouped_layers,
    unknown_keys_message,
)
from .veneer import LarvResult, apply_scales, compute_larv_scales

log = logging.getLogger(__name__)

LARV_KEYS = LarvSettings.keys()
# keys FusionBench's serialisation mixin understands; they are not LARV settings
_FUSION_BENCH_META_KEYS = ("_recursive_", "_usage_", "_version_")
# keys of a Hydra `_target_` config that are not constructor arguments
_HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_", "_args_")


class _PoolView(BaseModelPool):
    """A view of a model pool that hands the base merger fresh copies instead of the caller's
    in-memory modules (FusionBench's mergers overwrite what they load), optionally with every
    loaded model rewritten as θ_0 + s_ℓ·(θ_i − θ_0) (``placement: task_vectors``)."""

    def __init__(
        self,
        inner: BaseModelPool,
        theta0: Mapping[str, torch.Tensor] | None = None,
        param_scale: Mapping[str, float] | None = None,
        copy_instances: bool = True,
        checked: set[str] | None = None,
    ):
        self._inner = inner
        self._theta0 = theta0
        self._param_scale = param_scale
        self._copy_instances = copy_instances
        # names whose weights were already checked for NaN/Inf; every other load is checked
        self._checked = set() if checked is None else checked
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

    # what a specialised pool overrides beyond load_model (CLIPVisionModelPool's dataset loaders,
    # its save_model; model configs and paths) must reach the inner pool, not BaseModelPool's
    def get_model_config(self, *args, **kwargs):
        return self._inner.get_model_config(*args, **kwargs)

    def get_model_path(self, *args, **kwargs):
        return self._inner.get_model_path(*args, **kwargs)

    def load_train_dataset(self, *args, **kwargs):
        return self._inner.load_train_dataset(*args, **kwargs)

    def load_val_dataset(self, *args, **kwargs):
        return self._inner.load_val_dataset(*args, **kwargs)

    def load_test_dataset(self, *args, **kwargs):
        return self._inner.load_test_dataset(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        return self._inner.save_model(*args, **kwargs)

    def load_model(self, model_name_or_config, *args, **kwargs) -> nn.Module:
        model = self._inner.load_model(model_name_or_config, *args, **kwargs)
        is_name = isinstance(model_name_or_config, str)
        if not is_name or model_name_or_config not in self._checked:
            label = f"model `{model_name_or_config}`" if is_name else "a model of the pool"
            check_finite(model.state_dict(), label)
            if is_name:
                self._checked.add(model_name_or_config)
        if (
            self._copy_instances
            and is_name
            and isinstance(self._inner._models.get(model_name_or_config), nn.Module)
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


def _locate_class(target: str) -> type:
    """Import ``target`` (``package.module.Class``); a LarvConfigError with a suggestion if not."""
    module_name, _, attr = target.rpartition(".")
    problem, hint = None, ""
    try:
        module = importlib.import_module(module_name) if module_name else None
    except Exception as err:  # noqa: BLE001 - any import failure is the user's `_target_`
        module, problem = (
            None,
            f"cannot import module {module_name!r} ({type(err).__name__}: {err})",
        )
    if module is not None:
        try:
            obj = getattr(module, attr)
        except Exception:  # noqa: BLE001 - lazy modules raise what their import raises
            obj = None
        if isinstance(obj, type):
            return obj
        problem = f"{module_name!r} has no class {attr!r}"
        candidates = [n for n in dir(module) if n[:1].isupper()]  # classes, not submodules
        hint = did_you_mean(attr, candidates, n=3, prefix=f"{module_name}.")
    elif problem is None:
        problem = "not a dotted class path"
    raise LarvConfigError(
        f"LARV config `base_method._target_` = {target!r} is not allowed: {problem}{hint}; "
        "expected a FusionBench method class such as "
        "'fusion_bench.method.TaskArithmeticAlgorithm'"
    )


def _check_base_method(base_method: Any) -> None:
    """Construction-time checks of the wrapped merger's config: a known ``BaseAlgorithm`` class
    whose required arguments are all given, and no misspelt argument."""
    if base_method is None:
        raise LarvConfigError(
            "LARV needs `base_method`: a FusionBench method config with `_target_` "
            "(e.g. {'_target_': 'fusion_bench.method.TaskArithmeticAlgorithm', "
            "'scaling_factor': 0.3})"
        )
    if isinstance(base_method, BaseAlgorithm):
        return
    if not isinstance(base_method, Mapping):
        raise LarvConfigError(
            f"LARV config `base_method` = {base_method!r} is not allowed: a method config "
            "mapping with `_target_`, or a BaseAlgorithm instance"
        )
    if "_target_" not in base_method:
        raise LarvConfigError(
            f"LARV config `base_method` must have a `_target_` (a FusionBench method class), "
            f"got keys {list(base_method)}"
        )
    target = base_method["_target_"]
    if not isinstance(target, str) or not target:
        raise LarvConfigError(
            f"LARV config `base_method._target_` = {target!r} is not allowed: a class path string"
        )
    cls = _locate_class(target)
    if not issubclass(cls, BaseAlgorithm):
        raise LarvConfigError(
            f"LARV config `base_method._target_` = {target!r} is not allowed: {cls.__name__} is "
            "not a FusionBench BaseAlgorithm (a model merging method)"
        )
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # no introspectable signature: nothing more to check
        return
    named = {
        n: p for n, p in list(params.items())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    given = [str(k) for k in base_method.keys() if str(k) not in _HYDRA_KEYS]
    for key in given:
        if key in named or key.startswith("_"):
            continue
        hint = did_you_mean(key, named)
        if not takes_kwargs or hint:  # a typo of a real argument is an error even under **kwargs
            raise LarvConfigError(
                f"unknown `base_method` key `{key}`{hint} for {cls.__name__}; its arguments: "
                f"{sorted(named)}"
            )
    missing = [n for n, p in named.items() if p.default is p.empty and n not in given]
    if missing:
        raise LarvConfigError(
            f"`base_method` ({cls.__name__}) misses required argument(s) {missing}; given: {given}"
        )


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

    def __init__(self, base_method: Any = None, report_dir: str | None = None, **larv: Any):
        meta = {k: larv.pop(k) for k in _FUSION_BENCH_META_KEYS if k in larv}
        # Hydra hands every composed key over as a kwarg: a typo (`gama`) must fail here, first,
        # with a suggestion, before anything else is looked at
        unknown = set(larv) - set(LARV_KEYS)
        if unknown:
            raise LarvConfigError(
                unknown_keys_message(
                    unknown, {*LARV_KEYS, "base_method", "report_dir"}, "LARV method config"
                )
            )
        _check_base_method(base_method)
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise LarvConfigError(
                f"LARV config `report_dir` = {report_dir!r} is not allowed: null (the run's log "
                "dir) or a directory path"
            )
        self.base_method = base_method
        self.report_dir = None if report_dir is None else os.fspath(report_dir)
        larv = {
            k: (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v) for k, v in larv.items()
        }
        self.settings = LarvSettings.from_mapping(larv)
        for k in LARV_KEYS:
            setattr(self, k, getattr(self.settings, k))
        self.last_report: dict | None = None
        self.last_result: LarvResult | None = None
        super().__init__(**meta)

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
        s = self.settings
        # in-memory models are checked up front, so a bad one stops the run before the base
        # merger has modified any of the caller's modules
        checked = set()
        for name in modelpool.all_model_names:
            obj = modelpool._models.get(name)
            if isinstance(obj, nn.Module):
                check_finite(obj.state_dict(), f"model `{name}`")
                checked.add(name)
        with torch.no_grad():
            pretrained = modelpool.load_pretrained_model()
            if "_pretrained_" not in checked:
                check_finite(pretrained.state_dict(), "model `_pretrained_`")
                checked.add("_pretrained_")
            # our own copy of θ_0: every base merger overwrites the pretrained model it loads
            theta0 = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
            del pretrained
        # the layer structure depends on θ_0's names only: a model LARV cannot split into blocks
        # is refused before the (possibly long) base merge
        grouped_layers([k for k, v in theta0.items() if v.is_floating_point()], s.layer_pattern)

        if base_merge is not None:
            if s.placement != "merged":
                raise LarvConfigError(
                    "a precomputed `base_merge` can only be reused with `placement: merged`; with "
                    f"placement {s.placement!r} the base merger must run on the rescaled models"
                )
            # checked for NaN/Inf with every merge in compute_larv_scales below
            out = deepcopy(self._merged_module(base_merge))
        else:
            protect = s.placement == "task_vectors" and modelpool.has_instance_models
            # the view checks every model the base merger loads for NaN/Inf (fine-tuned
            # checkpoints)
            out = self._run_base(_PoolView(modelpool, copy_instances=protect, checked=checked))
        merged = self._merged_module(out)
        result = compute_larv_scales(theta0, merged.state_dict(), s, device=self._device())
        log.info("LARV scales per layer: %s (diagnostics %.1f s)",
                 [round(x, 4) for x in result.scales], result.seconds)  # fmt: skip
        for msg in result.warnings:
            log.warning("LARV: %s", msg)
            warnings.warn(msg, LarvWarning, stacklevel=2)

        if s.placement == "task_vectors":
            del out, merged
            out = self._run_base(_PoolView(modelpool, theta0, result.param_scale, checked=checked))
            merged = self._merged_module(out)
        else:
            apply_scales(theta0, merged.state_dict(), result.param_scale)

        self.last_result = result
        self.last_report = self._report(result)
        if base_merge is not None:
            self.last_report["base_merge"] = "reused"  # the base merger was not run again here
        self._write_report(self.last_report)
        return out

    # -- report ---------------------------------------------------------------------------------
    def _report(self, result: LarvResult) -> dict:
        base_cfg = self.base_method
        if isinstance(base_cfg, BaseAlgorithm):
            base_cfg = {"_target_": f"{type(base_cfg).__module__}.{type(base_cfg).__qualname__}"}
        elif OmegaConf.is_config(base_cfg):
            base_cfg = OmegaConf.to_container(base_cfg, resolve=True)
        report = {
            "settings": self.settings.to_dict(),
            "base_method": dict(base_cfg),
            **result.to_dict(),
        }
        # wall-clock time is logged and kept in `last_result.seconds`, not in the file: the same
        # inputs and settings must give an identical larv_layers.json
        report.pop("diagnostics_seconds", None)
        return report

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
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep what a plain open() gives
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _file_mode(path: str) -> int:
    """The existing file's mode, or 0666 minus the umask (what ``open(path, "w")`` would give)."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
