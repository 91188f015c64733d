"""Guarded LARV (docs/method.md, "Guarded LARV"): the tiered gate's spread δ chosen on held-out
labelled data. Uses data: not the paper's data-free method.

For each δ of ``validation.grid`` (levels 1 − δ, 1, 1 + δ; δ = 0 is the base merger bit for bit,
since unit scales leave every tensor untouched), LARV rescales a copy of one base merge; the
validation task pool scores each (:mod:`.selection`) and the best δ, the first among equals, is
returned. Listing δ = 0 first lets the choice refuse to rescale where rescaling does not help on
validation.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fusion_bench import BaseModelPool

from .pool_view import PoolView
from .selection import build_taskpool, choose, taskpool_report, validation_score
from .settings import LarvConfigError

__all__ = ["check_guarded", "run_guarded"]

log = logging.getLogger(__name__)


def check_guarded(settings, grid: tuple[float, ...]) -> None:
    """Guarded LARV varies the tiered levels of one merged-placement, merged-diagnostics run."""
    if (
        settings.gate != "tiered"
        or settings.placement != "merged"
        or settings.diagnostics != "merged"
    ):
        raise LarvConfigError(
            "LARV `validation` chooses the tiered gate's spread δ: it needs `gate: tiered`, "
            f"`placement: merged`, `diagnostics: merged` (got gate {settings.gate!r}, placement "
            f"{settings.placement!r}, diagnostics {settings.diagnostics!r})"
        )
    if max(grid) > 1.0:
        raise LarvConfigError(
            f"LARV `validation.grid` holds δ = {max(grid):g}: δ ≤ 1 (levels 1 − δ, 1, 1 + δ "
            "must stay ≥ 0)"
        )


def run_guarded(alg, modelpool: BaseModelPool, base_merge: Any = None) -> Any:
    """``alg`` (a :class:`~.algorithm.LARVAlgorithm` with ``validation``) run as guarded LARV:
    one base merge, one LARV run per δ on a copy of it, the best δ on validation returned, with
    its report (plus a ``validation`` block: grid, scores, chosen δ)."""
    from .algorithm import LARVAlgorithm

    taskpool_cfg, grid = alg.validation
    if base_merge is None:
        base_merge = alg._run_base(PoolView(modelpool, checked=set()))
    pool = build_taskpool(taskpool_cfg)
    best_out, best_alg, scores = None, None, []
    for delta in grid:
        settings = dataclasses.replace(alg.settings, levels=(1.0 - delta, 1.0, 1.0 + delta))
        inner = LARVAlgorithm(base_method=alg.base_method, **settings.to_dict())
        inner._fabric_instance = alg._fabric_instance  # the device; no program: no report file
        out = inner.run(modelpool, base_merge=base_merge)
        scores.append(validation_score(pool.evaluate(out)))
        log.info("guarded LARV: δ = %g scores %.4f on validation", delta, scores[-1])
        if choose(scores) == len(scores) - 1:
            best_out, best_alg = out, inner
        del out
    best = choose(scores)
    alg.settings = best_alg.settings
    report = dict(best_alg.last_report)
    report["base_merge"] = "computed once, shared by every δ"
    report["validation"] = {
        "parameter": "delta",
        "grid": list(grid),
        "scores": scores,
        "delta": grid[best],
        "levels": list(best_alg.settings.levels),
        "taskpool": taskpool_report(taskpool_cfg),
    }
    alg.last_result, alg.last_report = best_alg.last_result, report
    alg._write_report(report)
    return best_out
