"""LOT Merging as a FusionBench method (``method=lot_merging``): records each fine-tuned model's
layer inputs on a few exemplars of its own task with forward hooks, then merges layer by layer in
closed form (the mathematics, and every choice the notes leave open, are in :mod:`.lot`).

Unlike everything else in this package LOT is **not data-free**: it reads ``num_exemplars``
images per task from the model pool's *train* data sets (``modelpool.load_train_dataset(task)``),
drawn at random with a seed that depends on ``seed`` and the task's name only. Labels are never
used. Images are turned into pixel values the way the evaluation does: with the pool's processor
(``modelpool.load_processor()``, FusionBench's ``ImageClassificationDataset``, as the CLIP task pool
does) unless the data set already yields tensors (the real-weights testbed's pool does, with the
testbed's own pre-processing). Exemplars flow through the backbone only (``model(pixel_values=x)``);
classification heads are not merged and never see them.

Which parameters get what:

- every ``nn.Linear`` the forward pass reaches (in the HF CLIP / DINOv2 vision towers: q, k, v,
  out and the two MLP layers of every encoder block): LOT's closed form, bias included
  (``bias: joint``) or bias averaged (``bias: mean``);
- every ``nn.LayerNorm`` (and ``nn.RMSNorm``) it reaches: scale by per-dimension energy-weighted
  averaging, shift by the drift minimiser given that scale (``norms: energy``), or both averaged;
- everything else (patch / position / class embeddings, DINOv2's layer scales and mask token,
  layers no exemplar reached): the mean of the task vectors.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
from fusion_bench.mixins import LightningFabricMixin
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .lot import (
    BIAS_MODES,
    NORM_MODES,
    REGULARIZATIONS,
    GramAccumulator,
    LinearSpec,
    LOTAccumulator,
    NormSpec,
    NormStatsAccumulator,
)

log = logging.getLogger(__name__)

__all__ = [
    "LOTMergingAlgorithm",
    "exemplar_indices",
    "find_lot_layers",
    "record_layer_statistics",
]

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm,) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def find_lot_layers(model: nn.Module) -> tuple[dict[str, LinearSpec], dict[str, NormSpec]]:
    """Module name -> state-dict keys, for every ``nn.Linear`` and every normalisation layer with
    learnable parameters."""
    linears, norms = {}, {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            bias = f"{prefix}bias" if module.bias is not None else None
            linears[name] = LinearSpec(f"{prefix}weight", bias)
        elif isinstance(module, _NORM_TYPES):
            weight = f"{prefix}weight" if getattr(module, "weight", None) is not None else None
            bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
            if weight is not None or bias is not None:
                norms[name] = NormSpec(weight, bias)
    return linears, norms


def _normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's input normalised, before its affine part (``xhat``)."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _pixel_values(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return batch["pixel_values"] if "pixel_values" in batch else batch["image"]
    return batch[0]  # (inputs, labels)


@torch.no_grad()
def record_layer_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    linears: Mapping[str, bool],
    norms: Iterable[str],
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``model`` on ``batches`` with forward hooks and return, per layer, the statistics of
    its inputs: ``grams[name]`` (``X^T X / rows``, float64, augmented with a ones column where
    ``linears[name]`` is true) and ``norm_stats[name] = (mean xhat^2, mean xhat)``.
    Layers the forward pass never reaches are absent. ``forward(model, pixel_values)`` defaults
    to ``model(pixel_values=x)``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    forward = forward or (lambda m, x: m(pixel_values=x))
    modules = dict(model.named_modules())
    gram_acc = {name: GramAccumulator(augment) for name, augment in linears.items()}
    norm_acc = {name: NormStatsAccumulator() for name in norms}
    handles = []
    for name, acc in gram_acc.items():
        handles.append(modules[name].register_forward_hook(lambda m, i, o, acc=acc: acc.add(i[0])))
    for name, acc in norm_acc.items():
        handles.append(
            modules[name].register_forward_hook(
                lambda m, i, o, acc=acc: acc.add(_normalised(m, i[0]))
            )
        )
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            forward(model, _pixel_values(batch).to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    grams = {n: a.mean().cpu() for n, a in gram_acc.items() if a.rows}
    stats = {n: (a.energy().cpu(), a.mean().cpu()) for n, a in norm_acc.items() if a.rows}
    return grams, stats


def exemplar_indices(dataset_size: int, num_exemplars: int, seed: int, task: str) -> np.ndarray:
    """Sorted indices of ``min(num_exemplars, dataset_size)`` distinct items, drawn with a
    generator seeded by ``seed`` and the task's name (independent of the other tasks)."""
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode())])
    n = min(int(num_exemplars), int(dataset_size))
    return np.sort(rng.choice(int(dataset_size), size=n, replace=False))


@auto_register_config
class LOTMergingAlgorithm(LightningFabricMixin, BaseAlgorithm):
    """LOT Merging (Layer-wise Optimal Task vector merging; see :mod:`.lot`).

    Args:
        num_exemplars: images per task, from the model pool's train data set of that task.
        seed: seed of the exemplar draw (combined with the task name).
        batch_size: exemplars per forward pass.
        regularization: ``pinv`` (Moore-Penrose, the notes) | ``ridge`` | ``ridge_to_mean``.
        rcond: ``pinv``: eigenvalues below ``rcond * lambda_max`` of the summed Gram count as 0.
        ridge: ``ridge`` / ``ridge_to_mean``: ``lam = ridge * tr(G) / d`` (G the (mean) Gram).
        bias: ``joint`` (biases solved with their weights, augmented input) | ``mean``.
        norms: ``energy`` (the notes' energy-weighted scale, drift-optimal shift) | ``mean``.
        num_workers: data loader workers.
    """

    def __init__(
        self,
        num_exemplars: int = 32,
        seed: int = 0,
        batch_size: int = 32,
        regularization: str = "pinv",
        rcond: float = 1e-6,
        ridge: float = 1e-3,
        bias: str = "joint",
        norms: str = "energy",
        num_workers: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}")
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}")
        if norms not in NORM_MODES:
            raise ValueError(f"norms must be one of {NORM_MODES}")
        if int(num_exemplars) < 1 or int(batch_size) < 1:
            raise ValueError("num_exemplars and batch_size must be positive")
        self.last_stats: dict[str, Any] = {}

    # -- data -----------------------------------------------------------------------------------
    def _processor(self, modelpool: BaseModelPool):
        """The pool's processor, loaded once per pool (a CLIP processor takes a second)."""
        cached = getattr(self, "_processor_cache", None)
        if cached is None or cached[0] is not modelpool:
            cached = self._processor_cache = (modelpool, modelpool.load_processor())
        return cached[1]

    def exemplar_dataset(self, modelpool: BaseModelPool, task: str) -> Dataset:
        """The task's seeded exemplars, as ``(pixel_values, label)`` items."""
        from fusion_bench.dataset.image_dataset import ImageClassificationDataset

        if task not in (modelpool.train_dataset_names or []):
            raise ValueError(
                f"LOT Merging needs exemplars of task {task!r} from the model pool's train data "
                f"sets, but the pool has none for it (train data sets: "
                f"{list(modelpool.train_dataset_names or [])}); LOT is not data-free"
            )
        dataset = modelpool.load_train_dataset(task)
        first = dataset[0]
        image = first.get("image") if isinstance(first, Mapping) else first[0]
        if not isinstance(image, torch.Tensor):
            if not hasattr(modelpool, "load_processor"):
                raise TypeError(
                    f"train data set {task!r} yields {type(image).__name__} images and the model "
                    "pool has no `load_processor()` to turn them into pixel values"
                )
            dataset = ImageClassificationDataset(dataset, self._processor(modelpool))
        elif isinstance(first, Mapping):
            dataset = ImageClassificationDataset(dataset, None)
        idx = exemplar_indices(len(dataset), self.num_exemplars, self.seed, task)
        if len(idx) < self.num_exemplars:
            log.warning("LOT: task %s has only %d training images", task, len(idx))
        return Subset(dataset, idx.tolist())

    def exemplar_loader(self, modelpool: BaseModelPool, task: str) -> DataLoader:
        return DataLoader(
            self.exemplar_dataset(modelpool, task),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    # -- run ------------------------------------------------------------------------------------
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        device = self.fabric.device
        with torch.no_grad():
            pretrained = modelpool.load_pretrained_model()
            theta0 = {k: v.detach().cpu().clone() for k, v in pretrained.state_dict().items()}
        linears, norms = find_lot_layers(pretrained)
        if not linears:
            raise ValueError(f"LOT Merging found no nn.Linear in {type(pretrained).__name__}")
        acc = LOTAccumulator(
            linears, norms, self.regularization, self.rcond, self.ridge, self.bias, self.norms
        )
        augment = {name: acc.augmented(name) for name in linears}
        stats: dict[str, Any] = {"tasks": {}}
        t_start = time.perf_counter()
        for task in modelpool.model_names:
            t0 = time.perf_counter()
            model = modelpool.load_model(task)
            loader = self.exemplar_loader(modelpool, task)
            model.to(device)
            grams, norm_stats = record_layer_statistics(
                model, loader, augment, norms, device, self.forward_exemplars
            )
            model.to("cpu")
            with torch.no_grad():
                tv = {
                    k: v.detach().cpu() - theta0[k]
                    for k, v in model.state_dict().items()
                    if v.is_floating_point()
                }
            acc.add_task(tv, grams, norm_stats)
            del model, tv
            stats["tasks"][task] = {
                "exemplars": len(loader.dataset),
                "linear_layers": len(grams),
                "norm_layers": len(norm_stats),
                "seconds": time.perf_counter() - t0,
            }
            log.info("LOT: statistics of %s recorded (%s)", task, stats["tasks"][task])
        self._processor_cache = None
        merged_tv = acc.finalize()
        if acc.missing:
            log.warning("LOT: no exemplar reached %s; their task vectors are averaged", acc.missing)
        with torch.no_grad():
            sd = pretrained.state_dict()
            for key, t in merged_tv.items():
                sd[key].copy_((theta0[key].to(t.dtype) + t).to(sd[key].dtype))
        stats.update(
            missing=acc.missing,
            linear_layers=len(linears),
            norm_layers=len(norms),
            seconds=time.perf_counter() - t_start,
        )
        self.last_stats = stats
        return pretrained

    def forward_exemplars(self, model: nn.Module, pixel_values: torch.Tensor) -> Any:
        """How exemplars go through a backbone (override for models without ``pixel_values``)."""
        return model(pixel_values=pixel_values)
