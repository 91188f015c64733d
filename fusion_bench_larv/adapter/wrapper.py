"""The skeleton every wrapper of a base merger shares (LARV, guarded LARV, LiNeS): run the
wrapped merger as FusionBench would, keep its output, rescale its merged update
Δθ = θ_merged − θ_0 block by block in place, θ ← θ_0 + s_k·Δθ_k, and optionally choose one value
v* of a grid on held-out labelled data first (:mod:`.selection`). A subclass states only what
differs: its keys (:meth:`configure`), its scales (:meth:`scales`), the value a grid sets
(:meth:`adopt`), the values it accepts (:attr:`UpdateRescaler.domain`), the value that gives the
base merger back (:attr:`UpdateRescaler.base_value`) and any work before the merge
(:meth:`prepare`)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin
from torch import nn

from ..core.inputs import check_finite, grouped_layers
from ..core.keys import unknown_keys_message
from ..core.layers import LayerGroups
from ..core.state import spec_of
from ..core.veneer import apply_scales
from ..errors import LarvConfigError, LarvInputError, LarvWarning
from .base_method import (
    FUSION_BENCH_META_KEYS,
    base_method_name,
    base_method_report,
    build_base_method,
    check_base_method,
    merged_module,
    own_save_held,
    report_file,
    rng_kept,
    run_base_method,
    save_checkpoint,
    save_path_of,
    write_report,
)
from .model_state import (
    architecture_of,
    is_lazy,
    lazy_meta_module,
    repair_lazy_merge,
)
from .pool_view import PoolView, in_memory_model
from .selection import (
    Validation,
    build_taskpool,
    check_validation,
    choose,
    coverage,
    grow_grid,
    guard_interval,
    last_correctness,
    taskpool_report,
    validation_score,
)
from .theta0 import open_theta0

__all__ = ["MergeContext", "UpdateRescaler"]

log = logging.getLogger(__name__)


@dataclass
class MergeContext:
    """What one run knows before the merge: the pool, LARV's own θ_0 (every merger overwrites
    the pretrained model it loads): read from its checkpoint files when needed, or a copy
    (:func:`.theta0.open_theta0`), its floating-point names and their blocks, the
    models already checked for NaN/Inf, what a subclass's :meth:`UpdateRescaler.prepare`
    computed before the merge and what its :meth:`UpdateRescaler.measure` read from the merge."""

    pool: BaseModelPool
    theta0: Mapping[str, torch.Tensor]
    architecture: str
    names: list[str]
    groups: LayerGroups
    merger: str
    checked: set[str] = field(default_factory=set)
    prepared: Any = None
    measured: Any = None
    #: where the rescaled model is saved: the wrapped merger's own ``model_save_path`` (None: not
    #: saved here; FusionBench's program saves what ``run`` returns if told to)
    checkpoint: str | None = None
    #: a lazily loaded θ_0's meta module, tied (see ``model_state.repair_lazy_merge``); None for
    #: a built θ_0
    lazy_meta: nn.Module | None = None

    def check_task_model(self, task: str, state: Mapping[str, torch.Tensor]) -> None:
        """A fine-tuned model's state, before its task vector is read: finite (checked once per
        run and task) and holding every parameter of θ_0; ``LarvInputError`` otherwise."""
        if task not in self.checked:
            check_finite(state, f"model `{task}`")
            self.checked.add(task)
        missing = [k for k in self.names if k not in state]
        if missing:
            raise LarvInputError(f"model `{task}` lacks parameters of θ_0: {missing[:5]}")


class UpdateRescaler(BaseAlgorithm, LightningFabricMixin):
    """A base merger whose merged update is rescaled per parameter (see the module docstring).

    Args:
        base_method: the wrapped merger, a FusionBench method config with ``_target_`` (dict or
            DictConfig), or an already built ``BaseAlgorithm``.
        report_dir: where the JSON report goes; default: the program's log dir. Outside the CLI
            with no log dir nothing is written and the report is kept in ``self.last_report``.
        validation: null, or ``{taskpool: <task pool config on held-out labelled data>, grid:
            [values], grow, guard, uncovered}`` (:mod:`.selection`): the value :meth:`adopt`
            sets is chosen on that task pool (uses data).
        **keys: the subclass's own keys (:attr:`own_keys`), handed to :meth:`configure`.
    """

    #: how messages and the report name the method ("LARV", "LiNeS")
    method: ClassVar[str] = "wrapper"
    #: the subclass's own config keys
    own_keys: ClassVar[tuple[str, ...]] = ()
    #: the value ``validation`` chooses: (its report name, its symbol in messages)
    chosen: ClassVar[tuple[str, str]] = ("value", "v")
    #: the values :meth:`adopt` accepts, (lo, hi); None: open on that side
    domain: ClassVar[tuple[float | None, float | None]] = (None, None)
    #: the value that gives the base merger back bit for bit (None: there is none), which the
    #: guard compares against and ``uncovered: base`` keeps
    base_value: ClassVar[float | None] = None
    #: whether the guard is on when ``validation`` does not say
    guard_default: ClassVar[bool] = False

    base_method: Any
    report_dir: str | None
    validation: Validation | None
    last_report: dict | None

    def __init__(
        self, base_method: Any = None, report_dir: Any = None, validation: Any = None, **keys: Any
    ):
        meta = {k: keys.pop(k) for k in FUSION_BENCH_META_KEYS if k in keys}
        # Hydra hands every composed key over as a kwarg: a typo (`gama`) must fail here, first,
        # with a suggestion, before anything else is looked at
        unknown = set(keys) - set(self.own_keys)
        if unknown:
            allowed = {*self.own_keys, "base_method", "report_dir", "validation"}
            raise LarvConfigError(
                unknown_keys_message(unknown, allowed, f"{self.method} method config")
            )
        check_base_method(base_method)
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise LarvConfigError(
                f"{self.method} config `report_dir` = {report_dir!r} is not allowed: null (the "
                "run's log dir) or a directory path"
            )
        self.base_method = base_method
        self.report_dir = None if report_dir is None else os.fspath(report_dir)
        self.validation = check_validation(validation, self.method, self.chosen[1], self.domain,
                                           self.base_value, self.guard_default)  # fmt: skip
        self.last_report = None
        self.configure(**keys)
        super().__init__(**meta)

    # -- what a subclass states -------------------------------------------------------------------
    def configure(self, **keys: Any) -> None:
        """Check and keep the subclass's own keys (``self.validation`` is already set)."""

    @property
    def layer_pattern(self) -> str | None:
        """The regex that finds the blocks (null: auto-detect): the subclass's ``_layer_pattern``
        unless it overrides this."""
        return getattr(self, "_layer_pattern", None)

    @property
    def report_name(self) -> str:
        """The report's file name: the subclass's ``_report_name`` unless it overrides this."""
        name = getattr(self, "_report_name", None)
        if name is None:
            raise NotImplementedError(f"{type(self).__name__} states no report name")
        return name

    def prepare(self, ctx: MergeContext) -> Any:
        """Work on the pool before the merge (mergers may overwrite what they load); kept in
        ``ctx.prepared``."""
        return None

    def measure(self, ctx: MergeContext, state: Mapping[str, torch.Tensor]) -> Any:
        """What the scales need from the base merge itself, read once (a validation grid then
        rescales the same merge again and again); kept in ``ctx.measured``."""
        return None

    def scales(self, ctx: MergeContext, state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """(parameter → scale, report fields) for the merged model ``state`` under the current
        settings; any ``"warnings"`` among the fields are also raised as :class:`LarvWarning`."""
        raise NotImplementedError

    def adopt(self, value: float) -> None:
        """Set the value a validation grid varies."""
        raise NotImplementedError

    def chosen_report(self, value: float) -> dict:
        """Extra fields of the report's ``validation`` block for the chosen value."""
        return {}

    # -- the skeleton -------------------------------------------------------------------------------
    def run(
        self,
        modelpool: BaseModelPool | Mapping[str, nn.Module],
        base_merge: nn.Module | None = None,
    ) -> Any:
        """Merge with the base method, then rescale its merged update; returns what the base
        merger returned (its merged model rescaled in place).

        ``base_merge``: the base merger's output for this same model pool and base config,
        computed earlier (e.g. once for a sweep); a copy of it is rescaled and the merger is not
        run again. The caller vouches that the configs match; its module is left as it was.

        Every input problem is a :class:`LarvInputError` raised before anything is written (and,
        for in-memory models, before the base merger touches them)."""
        ctx = self.open(modelpool)
        ctx.prepared = self.prepare(ctx)
        if base_merge is not None:
            out = deepcopy(merged_module(base_merge, ctx.merger, ctx.theta0, ctx.architecture))
        else:
            # the view checks every model the base merger loads for NaN/Inf; choosing on
            # validation evaluates several models, so the caller's in-memory ones stay untouched
            view = PoolView(ctx.pool, copy_instances=self.validation is not None,
                            checked=ctx.checked)  # fmt: skip
            out = self.run_base(ctx, view)
        merged = self.merged_of(ctx, out)
        state = merged.state_dict()
        check_finite(state, f"the output of {ctx.merger}")
        ctx.measured = self.measure(ctx, state)
        chosen = None
        if self.validation is not None:
            chosen = self._choose(ctx, merged, state)
        param_scale, fields = self.scales(ctx, state)
        apply_scales(ctx.theta0, state, param_scale)
        self.warn(fields.get("warnings", ()))
        report = {**fields}
        if base_merge is not None:
            report["base_merge"] = "reused"  # the base merger was not run again here
        elif chosen is not None:
            report["base_merge"] = f"computed once, shared by every {self.chosen[1]}"
        if chosen is not None:
            report["validation"] = chosen
        return self.finish(out, report, ctx)

    def open(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> MergeContext:
        """The pool (a mapping name → model becomes one), checked: a ``_pretrained_`` entry, every
        in-memory model finite (before the merger may modify them), LARV's own θ_0 (streamed
        from its files where it can be, else a copy; the log says which), and its blocks (found
        from θ_0's names alone, before the possibly long merge)."""
        if not isinstance(modelpool, BaseModelPool):
            if not isinstance(modelpool, Mapping):
                raise LarvInputError(
                    f"{self.method} needs a FusionBench model pool or a mapping name -> model, "
                    f"got {type(modelpool).__name__}"
                )
            modelpool = BaseModelPool(dict(modelpool))
        if not modelpool.has_pretrained:
            raise LarvInputError(
                f"{self.method} needs the pretrained model θ_0, but the model pool has no "
                f"`_pretrained_` entry (models: {modelpool.all_model_names}). Add the base "
                "checkpoint under `_pretrained_` in the model pool config."
            )
        checked = set()
        for name in modelpool.all_model_names:
            obj = in_memory_model(modelpool, name)
            if obj is not None:
                check_finite(obj.state_dict(), f"model `{name}`")
                checked.add(name)
        # loading θ_0 must not move the RNG the base merger draws from (rng_kept)
        with rng_kept():
            pretrained = modelpool.load_pretrained_model()
            # LARV's own θ_0 (the merger overwrites what it loads), under the module's names
            theta0, how = open_theta0(modelpool, pretrained, "_pretrained_" in checked)
            checked.add("_pretrained_")
            architecture = architecture_of(pretrained)
            lazy_meta = lazy_meta_module(pretrained)
            del pretrained
        log.info("%s: %s", self.method, how)
        names = [k for k in theta0 if spec_of(theta0, k).is_floating_point()]
        groups = grouped_layers(names, self.layer_pattern)
        merger = base_method_name(self.base_method)
        return MergeContext(modelpool, theta0, architecture, names, groups, merger, checked,
                            checkpoint=save_path_of(self.base_method),
                            lazy_meta=lazy_meta)  # fmt: skip

    def merged_of(self, ctx: MergeContext, out: Any) -> nn.Module:
        """The merged model in the merger's output, checked against θ_0 (``merged_module``) and,
        for a lazy pool, repaired where FusionBench's lazy merge leaves memory uninitialised
        (``model_state.repair_lazy_merge``)."""
        if is_lazy(out):  # e.g. `merge_backbone: true`, which sets the backbone on a lazy θ_0
            raise LarvInputError(
                f"the base merger {ctx.merger} returned FusionBench's lazy state dict, not a "
                "model: it does not support this lazily loaded pool as configured (with "
                "`merge_backbone: true`, set `modelpool.enable_lazy_loading=false`)"
            )
        merged = merged_module(out, ctx.merger, ctx.theta0, ctx.architecture)
        if ctx.lazy_meta is not None:
            repair_lazy_merge(merged, ctx.lazy_meta)
        return merged

    def build_base_method(self) -> BaseAlgorithm:
        """A fresh instance of the wrapped merger, set up the way FusionBench's program sets up a
        top-level method (nested methods would otherwise never get the program's Fabric)."""
        return build_base_method(self.base_method, self._program, self._fabric_instance)

    def run_base(self, ctx: MergeContext, pool: BaseModelPool) -> Any:
        """The wrapped merger run on ``pool`` as FusionBench's program runs a method, its own save
        of the un-rescaled merge held back (:meth:`finish` saves the rescaled model there)."""
        base = self.build_base_method()
        with own_save_held(base):
            return run_base_method(base, pool)

    def _choose(self, ctx: MergeContext, merged: nn.Module, state: dict) -> dict:
        """Choose the value :meth:`adopt` sets on the validation task pool (:mod:`.selection`):
        every grid value applied to the merged update and scored, the grid grown by its rule
        until the best value is interior or at a bound, the coverage of the model pool's tasks
        checked, the guard applied; the value kept is adopted. ``state`` is left as the base
        merger made it. Returns the report's ``validation`` block."""
        v = self.validation
        name, symbol = self.chosen
        pool = build_taskpool(v.taskpool)
        kept = {k: state[k].clone() for k in ctx.names}
        tasks = list(ctx.pool.model_names)
        values: list[float] = []
        scores: list[float] = []
        correct: dict[float, dict] = {}
        covered: list[str] | None = None
        uncovered: list[str] = []
        pending, stopped = list(v.grid), ""
        while pending:
            value = pending.pop(0)
            before = len(getattr(pool, "per_sample_evaluations", None) or [])
            self.adopt(value)
            param_scale, _ = self.scales(ctx, state)
            apply_scales(ctx.theta0, state, param_scale)
            report = pool.evaluate(merged)
            for k in ctx.names:
                state[k].copy_(kept[k])
            if covered is None:
                covered, uncovered = coverage(report, tasks)
                self._check_coverage(covered, uncovered)
                if uncovered and v.uncovered == "base":
                    stopped = "uncovered: base"
                    break
            values.append(value)
            scores.append(validation_score(report))
            log.info("%s: %s = %g scores %.4f on validation", self.method, symbol, value,
                     scores[-1])  # fmt: skip
            if v.guard is not None:
                correct[value] = last_correctness(pool, before)
                if correct[value] is None:
                    raise LarvInputError(
                        f"{self.method}: the validation guard needs each example's correctness, "
                        f"and the validation task pool ({type(pool).__name__}) records none "
                        "(`per_sample_evaluations`): use a recording task pool (the testbed's "
                        "TestbedTaskPool, RecordingCLIPVisionModelTaskPool), or set "
                        "`validation.guard: false`"
                    )
            if not pending:
                pending, stopped = grow_grid(values, scores, v.grow)
        out = {"parameter": name, "grid": values, "scores": scores,
               "initial_grid": list(v.grid), "grow": v.grow and v.grow.to_dict(),
               "stopped": stopped, "tasks": covered, "uncovered_tasks": uncovered,
               "uncovered": v.uncovered}  # fmt: skip
        if stopped == "uncovered: base":
            chosen, out["best"], out["guard"] = self.base_value, None, None
        else:
            out["best"] = chosen = values[choose(scores)]
            self._warn_at_edge(chosen, values, stopped)
            out["guard"] = self._guard(v, chosen, correct, covered)
            if out["guard"] is not None and out["guard"]["significant"] is False:
                chosen = self.base_value
        self.adopt(chosen)
        out[name] = chosen
        return {**out, **self.chosen_report(chosen), "taskpool": taskpool_report(v.taskpool)}

    def _check_coverage(self, covered: list[str], uncovered: list[str]) -> None:
        """Name the model pool's tasks the validation report leaves out, in a warning or, under
        ``uncovered: refuse`` (the default), a :class:`LarvInputError`; a report that scores
        none of them is an error unless the base merger is kept."""
        if not uncovered:
            return
        v, symbol = self.validation, self.chosen[1]
        what = (f"the validation task pool holds no examples of task(s) {uncovered}: a {symbol} "
                f"chosen on it did not see them")  # fmt: skip
        if v.uncovered == "refuse" or (not covered and v.uncovered == "choose"):
            none = (
                "" if covered else "; it scores none of them (do its task names match the pool's?)"
            )
            raise LarvInputError(
                f"{self.method}: {what}{none}. Give every task validation examples, or set "
                "`validation.uncovered: base` (keep the base merger) or `choose` (choose on the "
                f"covered tasks {covered}, saying so)"
            )
        then = (f"keeping the base merger ({symbol} = {self.base_value:g}, `uncovered: base`)"
                if v.uncovered == "base" else f"choosing on {covered} only (`uncovered: choose`)")  # fmt: skip
        self.warn([f"{what}; {then}"], stacklevel=5)  # warn, _check_coverage, _choose, run, caller

    def _warn_at_edge(self, best: float, values: list[float], stopped: str) -> None:
        """Warn when the best value sits on an edge of a grid that stopped growing short of a
        bound (no rule, or ``max_values``): the optimum may lie beyond it."""
        lo, hi = self.domain
        at_edge = (best == max(values) and best != hi) or (best == min(values) and best != lo)
        if stopped in ("fixed grid", "max_values") and at_edge:
            symbol = self.chosen[1]
            self.warn([f"the best {symbol} = {best:g} is at the edge of the grid searched "
                       f"({stopped}): the best {symbol} may lie beyond it; give "
                       "`validation.grow` (or more values) to search further"], stacklevel=5)  # fmt: skip

    def _guard(self, v: Validation, best: float, correct: dict, tasks: list[str]) -> dict | None:
        """The guard's verdict on the best value (None without a guard): ``significant`` when its
        paired validation gain over the base value has an interval above 0 (None: the base value
        scored best itself)."""
        if v.guard is None:
            return None
        out = {**v.guard.to_dict(), "against": self.base_value}
        if best == self.base_value:
            return {**out, "gain": 0.0, "interval": None, "significant": None}
        iv = guard_interval(correct[best], correct[self.base_value], tasks, v.guard)
        significant = iv.lo > 0
        log.info("%s: %s = %g gains %+.4f [%+.4f, %+.4f] over %s = %g on validation: %s",
                 self.method, self.chosen[1], best, iv.delta, iv.lo, iv.hi, self.chosen[1],
                 self.base_value, "kept" if significant else "not significant, base merger kept")  # fmt: skip
        return {**out, "gain": iv.delta, "interval": [iv.lo, iv.hi], "significant": significant}

    def warn(self, messages: Any, stacklevel: int = 3) -> None:
        """Each message to the log and as a :class:`LarvWarning`; ``stacklevel`` counts the frames
        from here to the caller of :meth:`run` that the warning names (warn, run, the caller)."""
        for msg in messages:
            log.warning("%s: %s", self.method, msg)
            warnings.warn(msg, LarvWarning, stacklevel=stacklevel)

    def finish(self, out: Any, report: dict, ctx: MergeContext) -> Any:
        """Save the rescaled model where the merger would have saved its own (``ctx.checkpoint``,
        then also in the report), keep the report in ``last_report``, write it, return the
        merger's output."""
        if ctx.checkpoint is not None:
            model = merged_module(out, ctx.merger)
            description = (f"{self.method} over {ctx.merger}: θ_0 + s_ℓ·(θ_merged − θ_0) per block; "
                           f"per-block scales in {self.report_name}")  # fmt: skip
            save_checkpoint(ctx.pool, model, ctx.checkpoint, self.method, description, self.config)
            report["checkpoint"] = ctx.checkpoint
        self.last_report = report
        write_report(report, self.report_path(), self.method)
        return out

    def report_path(self) -> str | None:
        return report_file(self.report_dir, self._program, self.report_name)

    def base_method_report(self) -> dict:
        """The wrapped merger's config as plain data (an instance: its class only)."""
        return base_method_report(self.base_method)

    def device(self) -> torch.device | None:
        """The program's device (Fabric), if any."""
        fabric = self._fabric_instance
        return fabric.device if fabric is not None else None
