"""The wrapped base merger: its config checked when LARV is constructed (a misspelt class or
argument fails before any model is loaded), built and run the way FusionBench's program builds
and runs a top-level method, and its output reduced to the merged module (one model of θ_0's
architecture, or a :class:`LarvInputError` that names the merger and what it returned)."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..core.inputs import check_same_keys_and_shapes
from ..core.io import write_json_atomic
from ..core.keys import did_you_mean
from ..errors import LarvConfigError, LarvInputError

__all__ = [
    "FUSION_BENCH_META_KEYS",
    "SAVE_PATH_KEY",
    "base_method_name",
    "base_method_report",
    "build_base_method",
    "check_base_method",
    "locate_class",
    "merged_module",
    "report_file",
    "rng_kept",
    "own_save_held",
    "run_base_method",
    "save_checkpoint",
    "save_path_of",
    "write_report",
]

log = logging.getLogger(__name__)

#: keys FusionBench's serialisation mixin hands a wrapper's constructor; not the wrapper's own
FUSION_BENCH_META_KEYS = ("_recursive_", "_usage_", "_version_")


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """No gradients, and torch's global RNG (the CPU's and every started CUDA device's) restored
    when the block exits. Loading a model draws from it (transformers' ``from_pretrained`` does):
    the base merger must see the RNG as the program left it, so that a random merger (DARE) draws
    the same masks as when it runs alone with the same ``seed``."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        yield


def report_file(report_dir: str | None, program: Any, name: str) -> str | None:
    """Where a wrapper's JSON report goes: ``report_dir/name``, else the FusionBench program's
    ``log_dir/name``; None without either."""
    directory = report_dir
    if directory is None and program is not None:
        directory = getattr(program, "log_dir", None)
    return None if directory is None else os.path.join(directory, name)


def write_report(report: dict, path: str | None, who: str) -> None:
    """Write ``report`` to ``path`` (atomically), or log that it stays in ``last_report`` only."""
    if path is None:
        log.info("%s: no log dir; the per-layer report is kept in `last_report` only", who)
        return
    write_json_atomic(path, report)
    log.info("%s per-layer report written to %s", who, path)


# keys of a Hydra `_target_` config that are not constructor arguments
HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_", "_args_")


def locate_class(target: str) -> type:
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


def check_base_method(base_method: Any) -> None:
    """Construction-time checks of the wrapped merger's config: a known ``BaseAlgorithm`` class
    whose required arguments are all given, and no misspelt argument."""
    if base_method is None:
        raise LarvConfigError(
            "LARV needs `base_method`: a FusionBench method config with `_target_` "
            "(e.g. {'_target_': 'fusion_bench.method.TaskArithmeticAlgorithm', "
            "'scaling_factor': 0.3})"
        )
    if isinstance(base_method, BaseAlgorithm):
        _not_larv(type(base_method), type(base_method).__name__)
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
    cls = locate_class(target)
    if not issubclass(cls, BaseAlgorithm):
        raise LarvConfigError(
            f"LARV config `base_method._target_` = {target!r} is not allowed: {cls.__name__} is "
            "not a FusionBench BaseAlgorithm (a model merging method)"
        )
    _not_larv(cls, target)
    _check_arguments(cls, [str(k) for k in base_method.keys() if str(k) not in HYDRA_KEYS])


def _not_larv(cls: type, name: str) -> None:
    """LARV over LARV would rescale an already rescaled update with diagnostics of that update:
    no defined method (docs/method.md), so it is refused rather than run. A LARV wrapper is a
    class with a true ``_larv_wrapper_`` attribute (``LARVAlgorithm`` has it), so this module need
    not import the adapter that imports it."""
    if getattr(cls, "_larv_wrapper_", False) is True:
        raise LarvConfigError(
            f"LARV config `base_method` = {name} is itself LARV: wrap a FusionBench merger "
            "(e.g. method@method.base_method=ties_merging), not another larv_* method"
        )


def _check_arguments(cls: type, given: list[str]) -> None:
    """Every required argument of ``cls.__init__`` given; no unknown (or misspelt) one."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # no introspectable signature: nothing more to check
        return
    named = {
        n: p for n, p in list(params.items())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
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


def build_base_method(base_method: Any, program: Any = None, fabric: Any = None) -> BaseAlgorithm:
    """The wrapped merger, set up the way FusionBench's program sets up a top-level method (nested
    methods would otherwise never get the program's Fabric): a fresh instance for a config, the
    instance itself for a ``BaseAlgorithm``."""
    if isinstance(base_method, BaseAlgorithm):
        base = base_method
    else:
        cfg = base_method
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(dict(cfg))
        base = instantiate(cfg, _recursive_=cfg.get("_recursive_", False))
    if hasattr(base, "_program"):
        base._program = program
    if fabric is not None and hasattr(base, "_fabric_instance"):
        base._fabric_instance = fabric
    return base


def run_base_method(base: BaseAlgorithm, modelpool: BaseModelPool) -> Any:
    """``base.run(modelpool)`` between its ``on_run_start`` / ``on_run_end`` hooks, as
    FusionBench's program runs a method."""
    # no torch.no_grad() here: WUDI optimises with autograd inside its run()
    base.on_run_start()
    try:
        return base.run(modelpool)
    finally:
        base.on_run_end()


#: the merger key under which FusionBench's causal-LM mergers (``linear/*_for_causallm``: Task
#: Arithmetic, TIES, simple averaging) and Model Stock save their own merge
#: (``${path.log_dir}/checkpoint`` in their configs)
SAVE_PATH_KEY = "model_save_path"


def save_path_of(base_method: Any) -> str | None:
    """Where the wrapped merger (an instance or a config) would save its merge itself: its
    ``model_save_path``, None when unset."""
    if isinstance(base_method, BaseAlgorithm):
        path = getattr(base_method, SAVE_PATH_KEY, None)
    elif isinstance(base_method, Mapping):
        path = base_method.get(SAVE_PATH_KEY)  # a DictConfig resolves ${path.log_dir} here
    else:
        path = None
    return os.fspath(path) if path else None


@contextlib.contextmanager
def own_save_held(base: BaseAlgorithm) -> Iterator[None]:
    """The merger's own save (its ``model_save_path``) held back while the block runs: under a
    wrapper it would save the merge before rescaling; the wrapper saves the rescaled model there
    instead (:func:`save_checkpoint`). The attribute is restored afterwards."""
    path = getattr(base, SAVE_PATH_KEY, None)
    if not path:
        yield
        return
    setattr(base, SAVE_PATH_KEY, None)
    try:
        yield
    finally:
        setattr(base, SAVE_PATH_KEY, path)


def save_checkpoint(
    pool: BaseModelPool, model: nn.Module, path: str, who: str, description: str, config: Any
) -> None:
    """Save ``model`` (the wrapper's rescaled merge) to ``path`` the way the held-back merger
    would have: with a ``CausalLMPool``, as its ``save_model`` does for the causal-LM mergers
    (``save_pretrained``, the pool's tokenizer if it names one, a model card from ``config``);
    with any other pool, through that pool's ``save_model``."""
    from fusion_bench.modelpool import CausalLMPool  # imports peft: only when a model is saved

    if isinstance(pool, CausalLMPool):
        pool.save_model(model, path, save_tokenizer=pool.tokenizer is not None,
                        algorithm_config=config, description=description)  # fmt: skip
    else:
        pool.save_model(model, path)
    log.info("%s: the rescaled model is saved to %s (the base merger's `%s`; the merger's own "
             "save of its un-rescaled merge was held back)", who, path, SAVE_PATH_KEY)  # fmt: skip


def base_method_name(base_method: Any) -> str:
    """The wrapped merger (an instance or a ``_target_`` config) as messages name it:
    ``Class (module.Class)``; ``"the base method"`` when it is neither."""
    if isinstance(base_method, BaseAlgorithm):
        cls = type(base_method)
        target = f"{cls.__module__}.{cls.__qualname__}"
    elif isinstance(base_method, Mapping) and isinstance(base_method.get("_target_"), str):
        target = base_method["_target_"]
    else:
        return "the base method"
    return f"{target.rpartition('.')[2]} ({target})"


def _returned(out: Any) -> str:
    """What a merger returned, for messages: its type, and a mapping's keys and value types."""
    cls = type(out)
    what = f"{cls.__qualname__} ({cls.__module__}.{cls.__qualname__})"
    if isinstance(out, Mapping):
        items = list(out.items())
        shown = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in items[:5])
        what += f" {{{shown}{', …' if len(items) > 5 else ''}}}"
    return what


def merged_module(
    out: Any,
    merger: str = "the base method",
    theta0: Mapping[str, Any] | None = None,
    architecture: str = "θ_0's",
) -> nn.Module:
    """The merged model in a base merger's output: the output itself, or its ``merged`` entry
    (TSV-M with ``return_single_task_models``). With ``theta0``, it must also have θ_0's
    parameter names and shapes. Anything else (a dict of models, a modulated wrapper, another
    architecture) is a :class:`LarvInputError` naming ``merger`` and what it returned."""
    module = out
    if isinstance(out, Mapping) and isinstance(out.get("merged"), nn.Module):
        module = out["merged"]
    problem = None
    if not isinstance(module, nn.Module):
        problem = "LARV needs an nn.Module (or a dict with the merged model under 'merged')."
    elif theta0 is not None:
        try:
            check_same_keys_and_shapes(theta0, module.state_dict())
        except LarvInputError as err:
            problem = str(err)
    if problem is None:
        return module
    raise LarvInputError(
        f"LARV cannot rescale the output of the base merger {merger}: it returned "
        f"{_returned(out)}, not one model of the pretrained architecture ({architecture}). "
        f"{problem} LARV rescales θ_merged − θ_0 of a single merged model; a merger that returns "
        "several models (TALL masks), a task-modulated wrapper (EMR) or another architecture "
        "cannot be wrapped: run it without LARV."
    )


def base_method_report(base_method: Any) -> dict:
    """The wrapped merger's config as plain data for the report (an instance: its class only)."""
    if isinstance(base_method, BaseAlgorithm):
        cls = type(base_method)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
    if OmegaConf.is_config(base_method):
        base_method = OmegaConf.to_container(base_method, resolve=True)
    return dict(base_method)
