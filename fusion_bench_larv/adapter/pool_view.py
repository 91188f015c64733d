"""The model pool LARV hands to the wrapped base merger (see :class:`PoolView`).

FusionBench's ``BaseModelPool`` has no public accessor for its in-memory modules nor for its
data set configs, so this module is the one place that reads the pool's private fields
(``_models``, ``_train_datasets``, ``_val_datasets``, ``_test_datasets``).
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from typing import Any

import torch
from fusion_bench import BaseModelPool
from torch import nn

from ..core.inputs import check_finite
from ..core.veneer import apply_scales
from ..errors import LarvInputError
from .model_state import is_lazy, model_state, served, state_copy, store_into


def in_memory_model(pool: BaseModelPool, name: str) -> nn.Module | None:
    """The pool's entry ``name`` if it is an already built ``nn.Module`` (the caller's own object,
    which a merger that loads it may modify), else None."""
    obj = pool._models.get(name)
    return obj if isinstance(obj, nn.Module) else None


class PoolView(BaseModelPool):
    """A model pool that stands in for the caller's pool while the base merger runs.

    Why it exists: FusionBench's mergers overwrite what they load (Task Arithmetic returns the
    ``_pretrained_`` model it loaded, modified), and LARV must keep control over three things the
    merger does through ``load_model``:

    - every model the merger loads is checked for NaN/Inf (once per name; ``checked`` lists the
      names already checked), so a bad fine-tuned checkpoint is a clear
      :class:`~fusion_bench_larv.errors.LarvInputError`, not a meaningless merge;
    - with ``copy_instances`` the merger gets fresh copies of the caller's in-memory modules
      instead of the modules themselves;
    - with ``theta0`` and ``param_scale`` (``placement: task_vectors``) every loaded model is
      rewritten as θ_0 + s_ℓ·(θ_i − θ_0), and ``_pretrained_`` as LARV's own copy of θ_0.
      ``param_scale`` is either one mapping parameter → scale, the same for every model, or
      (``diagnostics: per_task``) a mapping model name → its own parameter → scale mapping.

    A lazy model (FusionBench's ``LazyStateDict``: a ``CausalLMPool`` with lazy loading) is
    checked one tensor at a time, rewritten in its cache, and served as a
    :class:`~.model_state.ServedLazyStateDict`, which FusionBench's simple averaging can read.

    Everything else (a specialised pool's processor, tokenizer, data set loaders, model configs
    and paths, its own ``config``, ``save_model``) goes to the inner pool, so a merger that reads data (e.g. LOT)
    sees the pool it was configured with.
    """

    def __init__(
        self,
        inner: BaseModelPool,
        theta0: Mapping[str, torch.Tensor] | None = None,
        param_scale: Mapping[str, float] | Mapping[str, Mapping[str, float]] | None = None,
        copy_instances: bool = True,
        checked: set[str] | None = None,
    ):
        self._inner = inner
        self._theta0 = theta0
        self._param_scale = param_scale
        # per model: every value is a mapping parameter -> scale (checked, not guessed per call)
        values = list(param_scale.values()) if param_scale is not None else []
        self._per_model = bool(values) and isinstance(values[0], Mapping)
        if any(isinstance(v, Mapping) != self._per_model for v in values):
            raise TypeError(
                "`param_scale` must map every parameter to a scale, or every model name to its "
                "own parameter -> scale mapping, not a mix of both"
            )
        self._copy_instances = copy_instances
        # names whose weights were already checked for NaN/Inf; every other load is checked
        self._checked = set() if checked is None else checked
        super().__init__(
            models=dict.fromkeys(inner.all_model_names),
            # the data set configs, so that BaseModelPool's own properties (train_dataset_names,
            # has_train_dataset, …) answer as the inner pool's
            train_datasets=inner._train_datasets,
            val_datasets=inner._val_datasets,
            test_datasets=inner._test_datasets,
        )

    def __getattr__(self, name: str) -> Any:  # processor, tokenizer, … of specialised pools
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    @property
    def config(self) -> Any:
        """The inner pool's config: a merger may build a pool of its own from it (the causal-LM
        mergers' ``merge_backbone: true`` builds a ``CausalLMBackbonePool``)."""
        return self._inner.config

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
        if self._added_here(model_name_or_config):
            # the merger's own intermediate (Singular Value Calibration adds its inner merge as
            # `_merged_` and loads it back): served as added, neither checked nor rescaled
            return super().load_model(model_name_or_config, *args, **kwargs)
        model = served(self._inner.load_model(model_name_or_config, *args, **kwargs))
        is_name = isinstance(model_name_or_config, str)
        if not is_name or model_name_or_config not in self._checked:
            label = f"model `{model_name_or_config}`" if is_name else "a model of the pool"
            check_finite(model_state(model), label)  # a lazy model: read tensor by tensor
            if is_name:
                self._checked.add(model_name_or_config)
        if (
            self._copy_instances
            and is_name
            and in_memory_model(self._inner, model_name_or_config) is not None
        ):
            model = deepcopy(model)
        if self._theta0 is not None and is_name:
            with torch.no_grad():
                # a lazy model reads its tensors from disk on every access: rewrite a copy of
                # them and store it in the lazy dict, which the merger then reads
                sd = state_copy(model) if is_lazy(model) else model.state_dict()
                if model_name_or_config == "_pretrained_":
                    for k, v in self._theta0.items():
                        sd[k].copy_(v)
                else:
                    apply_scales(self._theta0, sd, self._scales_of(model_name_or_config))
                if is_lazy(model):
                    store_into(model, sd)
        return model

    def _scales_of(self, name: str) -> Mapping[str, float]:
        """The parameter -> scale mapping for model ``name``: its own under per-model scales."""
        if not self._per_model:
            return self._param_scale
        if name not in self._param_scale:
            raise LarvInputError(
                f"the base merger loaded model `{name}`, which has no per-task scales (LARV "
                f"computed them for {sorted(self._param_scale)}: the pool's `model_names`). "
                "Use `diagnostics: merged` with this merger, or remove the model from the pool"
            )
        return self._param_scale[name]

    def _added_here(self, name: Any) -> bool:
        """Whether ``name`` was added to this view by the merger during its run (``add_model``),
        rather than being one of the inner pool's models."""
        return (
            isinstance(name, str)
            and name not in self._inner.all_model_names
            and isinstance(self._models.get(name), nn.Module)
        )
