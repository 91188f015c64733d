"""Per-block scales fitted on validation labels, on the testbeds: the ceiling of per-block
rescaling (docs/method.md, "The ceiling of per-block rescaling"). Uses labelled validation
examples: not data-free, and not a method to recommend; it measures how much room the family
of LARV, the depth ramps and LiNeS (one scale per block of the merged update) has.

The wrapper skeleton (:class:`~fusion_bench_larv.adapter.wrapper.UpdateRescaler`) runs the base
merger and keeps its output; :meth:`TestbedFittedBlockScales.measure` fits the scales
(:func:`~fusion_bench_larv.core.fitted_scales.fit_block_scales`: Adam from s = 1, the base
merge) on the cross-entropy of each task's labelled validation examples through the testbed's
frozen heads (image or text; on the decoder testbed, of the answer tokens given the prompt), one
batch per task and step, summed over the tasks, as
:mod:`.adamerging` sums its entropies. Two readings:

- ``per_task: false``: one scale per block of the merged update Δθ = θ_merged − θ_0, plus one
  for the parameters outside the blocks (any merger);
- ``per_task: true``: one scale per task vector and block, for a merger whose merge is
  θ_0 + λ Σ_t τ_t (Task Arithmetic, simple averaging: checked, λ read off the merge).

The validation examples are the task pool's ``split: validation`` (held out from the training
pool; never a test example); the test set is never read. Written beside the run's report:
``fitted_block_scales.json`` (the scales per block, the loss curve, the tasks the fit saw).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from copy import deepcopy
from typing import Any

import torch
from fusion_bench import BaseModelPool
from omegaconf import OmegaConf
from torch import nn

from fusion_bench_larv.adapter.base_method import merged_module, rng_kept
from fusion_bench_larv.adapter.pool_view import PoolView
from fusion_bench_larv.adapter.selection import build_taskpool, taskpool_report
from fusion_bench_larv.adapter.wrapper import MergeContext, UpdateRescaler
from fusion_bench_larv.core.diagnostics import compute_dtype
from fusion_bench_larv.core.fitted_scales import (
    BlockFit,
    call_with,
    common_coefficient,
    compose,
    fit_block_scales,
    group_of,
)
from fusion_bench_larv.core.inputs import check_finite
from fusion_bench_larv.errors import LarvConfigError, LarvInputError

from .pools import trimmed

__all__ = ["FITTED_SCALES", "TestbedFittedBlockScales"]

log = logging.getLogger(__name__)

FITTED_SCALES = "fitted_block_scales.json"
#: what the report calls the group of the parameters outside the blocks
OUTSIDE = "outside the blocks"


def index_batches(n: int, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of ``min(size, n)`` indices into ``range(n)``, reshuffled every pass
    (seeded); a pass drops its last incomplete batch."""
    size = min(size, n)
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def labelled_batches(
    x: Mapping[str, torch.Tensor], y: torch.Tensor, size: int, seed: int
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Endless ``(inputs, labels)`` batches of encoded examples (:func:`index_batches`). Texts
    are cut to their longest."""
    for idx in index_batches(len(y), size, seed):
        yield trimmed({k: v[idx] for k, v in x.items()}), y[idx]


def tied_aliases(module: nn.Module, names: Iterable[str]) -> list[str]:
    """The names among ``names`` under which ``module`` holds a parameter it already holds
    under an earlier name (tied weights: a decoder's ``lm_head.weight`` and
    ``model.embed_tokens.weight``). The fit passes one value per tensor, under its first name
    (:func:`torch.func.functional_call` ties the others to it)."""
    first = {name for name, _ in module.named_parameters()}  # one name per tensor, the first
    every = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return [k for k in names if k in every and k not in first]


def fitted_groups(ctx: MergeContext, module: nn.Module) -> dict[str, int]:
    """b(k) of every name the fit scales (:func:`group_of`), a tied tensor under its first name
    only (:func:`tied_aliases` of ``module``): one tensor, one scale, as LARV gives it."""
    group = group_of(ctx.groups, ctx.names)
    for k in tied_aliases(module, group):
        del group[k]
    return group


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LarvConfigError(f"fitted block scales config `{key}` = {value!r}: a positive integer")
    return value


class TestbedFittedBlockScales(UpdateRescaler):
    """Per-block scales fitted on the testbed's labelled validation examples (module docstring).

    Config keys (``LarvTestbed/fitted_block_scales.yaml``): ``base_method``; ``validation_taskpool``
    (the testbed task pool config with ``split: validation``, or such a task pool: what the fit
    reads of it is its ``split``, ``examples(task)``, ``testbed.tasks`` and
    ``testbed.classifier(task, backbone)``,
    whose parameters under ``backbone.`` are the merged model's); ``per_task``; ``steps``, ``lr``,
    ``batch_size`` (examples per task and step), ``seed`` (the batches' order);
    ``linear_tolerance`` (``per_task``: the largest relative residual ‖Δθ − λ Σ τ‖ / ‖Δθ‖ of a
    merge taken for θ_0 + λ Σ_t τ_t); ``layer_pattern``; ``report_name``."""

    __test__ = False
    method = "fitted block scales"
    own_keys = ("validation_taskpool", "per_task", "steps", "lr", "batch_size", "seed",
                "linear_tolerance", "layer_pattern", "report_name")  # fmt: skip
    _config_mapping = UpdateRescaler._config_mapping | {
        k: k for k in ("base_method", "report_dir", *own_keys)
    }

    def configure(
        self,
        validation_taskpool: Any = None,
        per_task: bool = False,
        steps: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        linear_tolerance: float | None = None,
        layer_pattern: str | None = None,
        report_name: str = FITTED_SCALES,
    ) -> None:
        hyper = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                 "linear_tolerance": linear_tolerance}  # fmt: skip
        unset = [k for k, v in hyper.items() if v is None]
        if unset:
            raise LarvConfigError(
                f"fitted block scales config: set {', '.join(f'`{k}`' for k in unset)} (the "
                "benchmark's values: larv_lab/config/method/LarvTestbed/fitted_block_scales.yaml)"
            )
        if self.validation is not None:
            raise LarvConfigError(
                "fitted block scales fit every scale on `validation_taskpool`; `validation` (a "
                "grid to choose one value on) does not apply"
            )
        if OmegaConf.is_config(validation_taskpool):
            validation_taskpool = OmegaConf.to_container(validation_taskpool, resolve=True)
        built = hasattr(validation_taskpool, "examples")
        if not built and (
            not isinstance(validation_taskpool, Mapping) or "_target_" not in validation_taskpool
        ):
            raise LarvConfigError(
                "fitted block scales need `validation_taskpool`: the testbed task pool config "
                "with `split: validation` (the labelled examples held out from training), e.g. "
                "{_target_: larv_lab.testbed.pools.TestbedTaskPool, recipe: full, "
                f"split: validation, val_size: 200}}; got {validation_taskpool!r}"
            )
        split = (getattr if built else dict.get)(validation_taskpool, "split", None)
        if split != "validation":
            raise LarvConfigError(
                "fitted block scales read labelled validation examples only: "
                f"`validation_taskpool.split` must be `validation`, not {split!r} (the test set "
                "is never fitted on)"
            )
        if not isinstance(per_task, bool):
            raise LarvConfigError(f"fitted block scales config `per_task` = {per_task!r}: a bool")
        for key, value in (("lr", lr), ("linear_tolerance", linear_tolerance)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value <= 0:
                raise LarvConfigError(
                    f"fitted block scales config `{key}` = {value!r}: a positive number"
                )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise LarvConfigError(f"fitted block scales config `seed` = {seed!r}: an integer")
        self.validation_taskpool = validation_taskpool if built else dict(validation_taskpool)
        self.per_task = per_task
        self.steps = _positive_int(steps, "steps")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.lr, self.seed, self.linear_tolerance = float(lr), seed, float(linear_tolerance)
        self._layer_pattern = layer_pattern
        self._report_name = report_name
        self.last_fit: BlockFit | None = None

    # -- the reading with one scale per block of the merged update --------------------------------
    def measure(self, ctx: MergeContext, state: Mapping[str, torch.Tensor]) -> dict:
        """The fit on the merged update Δθ = θ_merged − θ_0 (one source)."""
        update = {k: _float(state[k]) - _float(ctx.theta0[k]) for k in ctx.names}
        return self._fit(ctx, [update], ["merged update"])

    def scales(self, ctx: MergeContext, state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        fitted = ctx.measured
        row = fitted["scales"][0]
        group = group_of(ctx.groups, ctx.names)
        return {k: row[b] for k, b in group.items()}, fitted

    # -- the reading with one scale per (task vector, block) --------------------------------------
    def run(
        self,
        modelpool: BaseModelPool | Mapping[str, nn.Module],
        base_merge: nn.Module | None = None,
    ) -> Any:
        """The base merge with fitted scales (see the module docstring); ``per_task: true``
        writes θ_0 + Σ_t Σ_b s_{t,b} λ τ_t,b into the merged model (the per-block path is the
        skeleton's, :meth:`UpdateRescaler.run`)."""
        if not self.per_task:
            return super().run(modelpool, base_merge)
        ctx = self.open(modelpool)
        if base_merge is not None:
            out = deepcopy(merged_module(base_merge, ctx.merger, ctx.theta0, ctx.architecture))
        else:
            # the merger gets copies of in-memory models: the task vectors are read after it
            view = PoolView(ctx.pool, copy_instances=True, checked=ctx.checked)
            out = self.run_base(ctx, view)
        merged = merged_module(out, ctx.merger, ctx.theta0, ctx.architecture)
        state = merged.state_dict()
        check_finite(state, f"the output of {ctx.merger}")
        tasks, taus = self._task_vectors(ctx)
        lam, resid = common_coefficient(ctx.theta0, state, taus, ctx.names)
        if not resid <= self.linear_tolerance:
            raise LarvInputError(
                f"`per_task: true` needs a merge θ_0 + λ Σ_t τ_t (Task Arithmetic, simple "
                f"averaging); {ctx.merger}'s merged update is {resid:.3g} (relative) away from the "
                f"nearest λ Σ_t τ_t (λ = {lam:.4g}; tolerance {self.linear_tolerance:g}). "
                "Use `per_task: false` (one scale per block of the merged update)"
            )
        sources = [{k: lam * tau[k] for k in ctx.names} for tau in taus]
        del taus
        fitted = self._fit(ctx, sources, tasks)
        fitted["lambda"], fitted["lambda_residual"] = lam, resid
        group = fitted_groups(ctx, merged)
        theta0 = {k: _float(ctx.theta0[k]) for k in ctx.names}
        with torch.no_grad():
            new = compose(theta0, sources, group, torch.tensor(fitted["scales"]))
            for k, v in new.items():
                state[k].copy_(v.to(state[k].dtype))
        report = {**fitted, "base_merge": "reused" if base_merge is not None else "computed"}
        return self.finish(out, report, ctx)

    def _task_vectors(self, ctx: MergeContext) -> tuple[list[str], list[dict]]:
        """The pool's fine-tuned models as task vectors τ_t = θ_t − θ_0 (float32 or wider)."""
        tasks = list(ctx.pool.model_names)
        if not tasks:
            raise LarvInputError("`per_task: true` needs fine-tuned models; the pool has none")
        taus = []
        for task in tasks:
            with rng_kept():  # loading must not move the RNG the base merger draws from
                sd = ctx.pool.load_model(task).state_dict()
            ctx.check_task_model(task, sd)
            taus.append({k: _float(sd[k]) - _float(ctx.theta0[k]) for k in ctx.names})
        return tasks, taus

    # -- the fit ------------------------------------------------------------------------------------
    def _fit(
        self,
        ctx: MergeContext,
        updates: list[dict[str, torch.Tensor]],
        sources: list[str],
    ) -> dict:
        """Fit s (sources × (L + 1)) on the validation examples; the report's fields."""
        cfg = self.validation_taskpool
        pool = cfg if hasattr(cfg, "examples") else build_taskpool(cfg)
        if getattr(pool, "split", None) != "validation":
            raise LarvConfigError(
                "fitted block scales read labelled validation examples only; the task pool "
                f"built from `validation_taskpool` evaluates on split {getattr(pool, 'split', None)!r}"
            )
        tasks = list(ctx.pool.model_names)
        unknown = [t for t in tasks if t not in pool.testbed.tasks]
        if unknown:
            raise LarvInputError(
                f"tasks {unknown} of the model pool have no head in the validation task pool's "
                f"testbed ({list(pool.testbed.tasks)})"
            )
        examples = {t: pool.examples(t) for t in tasks}
        covered = [t for t in tasks if len(examples[t][1]) > 0]
        without = [t for t in tasks if t not in covered]
        if not covered:
            raise LarvInputError("no task of the model pool has labelled validation examples")
        warnings = []
        if without:
            warnings.append(
                f"tasks {without} have no labelled validation examples (their training pool was "
                "used up): the scales are fitted on the other tasks only and applied to all"
            )
            self.warn(warnings, stacklevel=5)  # warn, _fit, measure, run, the caller
        device = self._fit_device()
        # the architecture the fit calls with θ(s) in place of its own weights: a fresh θ_0
        # (a copy: an in-memory model stays as it was); the merged model stays where it is
        with rng_kept():
            arch = deepcopy(ctx.pool.load_pretrained_model()).to(device).eval()
        loss = self._loss(pool, arch, examples, covered, device)

        def on_step(step: int, value: float) -> None:
            if step % 50 == 0 or step == self.steps - 1:
                log.info("fitted block scales: step %d of %d, loss %.4f", step + 1, self.steps,
                         value)  # fmt: skip

        group = fitted_groups(ctx, arch)
        theta0 = {k: _float(ctx.theta0[k]).to(device) for k in ctx.names}
        updates = [{k: v.to(device) for k, v in u.items()} for u in updates]
        fit = fit_block_scales(theta0, updates, group, ctx.groups.num_layers + 1, loss,
                               self.steps, self.lr, on_step)  # fmt: skip
        self.last_fit = fit
        log.info("fitted block scales (%s): %s (%.0f s)", ", ".join(sources),
                 [[round(s, 3) for s in row] for row in fit.scales], fit.seconds)  # fmt: skip
        sizes = [0] * (ctx.groups.num_layers + 1)
        for k, b in group.items():
            sizes[b] += ctx.theta0[k].numel()
        return {
            "method": "per-block scales fitted on validation labels",
            "reading": "per (task vector, block)" if self.per_task else "per block",
            "base_method": self.base_method_report(),
            "layer_pattern": ctx.groups.pattern,
            "groups": [*ctx.groups.prefixes, OUTSIDE],
            "group_params": sizes,
            "sources": sources,
            "scales": fit.scales,
            "fit": {
                "loss": "cross-entropy of one batch of labelled validation examples per task, "
                "summed over the tasks; curve[i] before step i's update (curve[0]: s = 1, the "
                "base merge)",
                "optimizer": "adam",
                "steps": fit.steps,
                "lr": self.lr,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "seconds": fit.seconds,
                "curve": fit.curve,
            },
            "validation": {
                "taskpool": type(cfg).__name__ if cfg is pool else taskpool_report(cfg),
                "examples": {t: len(examples[t][1]) for t in tasks},
                "uncovered_tasks": without,
            },
            "warnings": warnings,
        }

    def _loss(self, pool, arch: nn.Module, examples: dict, covered: list[str], device):
        """ℓ(θ(s), step): the cross-entropy of one batch of each covered task's validation
        examples, summed over the tasks; through each task's frozen head, or, on a decoder
        testbed, of the answer tokens given each prompt
        (:func:`~.decoder_build.answer_token_loss`)."""
        if pool.testbed.modality == "generation":
            from .decoder_build import AnswerLoss, answer_batch

            tokenizer, recipe = pool.testbed.tokenizer(), pool.testbed.recipe
            batches = {t: index_batches(len(examples[t][1]), self.batch_size, self.seed + i)
                       for i, t in enumerate(covered)}  # fmt: skip
            loss_module = AnswerLoss(arch)

            def task_loss(params: Mapping[str, torch.Tensor], t: str) -> torch.Tensor:
                idx = next(batches[t]).numpy()
                x, y = examples[t]
                batch = answer_batch(tokenizer, x[idx], y[idx], recipe, device)
                return call_with(loss_module, params, prefix="lm.")(**batch)
        else:
            heads = {t: pool.testbed.classifier(t, backbone=arch).to(device) for t in covered}
            batches = {t: labelled_batches(*examples[t], self.batch_size, self.seed + i)
                       for i, t in enumerate(covered)}  # fmt: skip

            def task_loss(params: Mapping[str, torch.Tensor], t: str) -> torch.Tensor:
                x, y = next(batches[t])
                x = {k: v.to(device) for k, v in x.items()}
                logits = call_with(heads[t], params, prefix="backbone.")(**x)
                return nn.functional.cross_entropy(logits, y.to(device))

        def loss(params: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
            total = torch.zeros((), device=device)
            for t in covered:
                total = total + task_loss(params, t)
            return total

        return loss

    def _fit_device(self) -> torch.device:
        device = self.device()
        if device is not None:
            return device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _float(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in float32 (float64 for float64 weights)."""
    return t.detach().to(compute_dtype(t.dtype))
