"""LOT Merging: the closed form against direct least-squares solves, the accumulator's
regularised and joint solutions, the exemplar draw and bad options (the lab's
tests/test_lot_e2e.py runs it on real models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fusion_bench_larv.methods.lot import (
    LinearSpec,
    LOTAccumulator,
    NormSpec,
    feature_drift,
    lot_closed_form,
    lot_norm_scale,
    lot_norm_shift,
)
from fusion_bench_larv.methods.lot_algorithm import (
    LOTMergingAlgorithm,
    exemplar_indices,
)

D = torch.float64
UNIT = {"gate": "schedule", "schedule": "uniform", "schedule_scales": [1.0]}
LOT_TARGET = "fusion_bench_larv.LOTMergingAlgorithm"


# ------------------------------------------------------------------------------- the mathematics
def _problem(seed: int, k: int, rows: list[int], d: int, out: int):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=D) * (1 + i) for i, n in enumerate(rows[:k])]
    ts = [torch.randn(out, d, generator=g, dtype=D) for _ in range(k)]
    return xs, ts


def _lstsq(xs, ts, extra_rows=()):
    """argmin_T sum_i ||X_i (T - T_i)^T||^2 / n_i (+ extra (A, B) rows ||A T^T - B||^2), solved
    directly by stacking the rows (minimum-norm solution: gelsd)."""
    a = [x / x.shape[0] ** 0.5 for x in xs] + [r[0] for r in extra_rows]
    b = [x @ t.T / x.shape[0] ** 0.5 for x, t in zip(xs, ts, strict=True)]
    b += [r[1] for r in extra_rows]
    return torch.linalg.lstsq(torch.cat(a), torch.cat(b), driver="gelsd").solution.T


def _grams(xs):
    return [x.T @ x / x.shape[0] for x in xs]


@pytest.mark.parametrize(
    ("seed", "rows", "d"),
    [(0, [40, 25, 60], 12), (1, [9, 30, 7], 16), (2, [3, 4, 2], 20), (3, [50], 8)],
    ids=["full_rank", "each_deficient_sum_full", "sum_deficient", "one_task"],
)
def test_closed_form_matches_direct_least_squares(seed, rows, d):
    xs, ts = _problem(seed, len(rows), rows, d, out=5)
    ours = lot_closed_form(ts, _grams(xs), "pinv", rcond=1e-10)
    ref = _lstsq(xs, ts)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)
    if len(rows) == 1 and rows[0] >= d:  # one task, full rank: its own task vector
        torch.testing.assert_close(ours, ts[0])
    elif sum(rows) >= d:  # full rank, several tasks: unique, and not the plain average
        assert not torch.allclose(ours, torch.stack(ts).mean(0), atol=1e-3)


def test_ridge_regularisations_match_augmented_least_squares():
    xs, ts = _problem(4, 3, [6, 5, 4], 18, out=4)  # sum of Grams rank deficient
    grams, k, d = _grams(xs), 3, 18
    lam = 0.05 * torch.trace(sum(grams)) / (d * k)
    # ridge: the prior lam_tot ||T||^2 with lam_tot = ridge * tr(sum G) / d
    lam_tot = 0.05 * torch.trace(sum(grams)) / d
    ref = _lstsq(xs, ts, [(lam_tot.sqrt() * torch.eye(d, dtype=D), torch.zeros(d, 4, dtype=D))])
    torch.testing.assert_close(lot_closed_form(ts, grams, "ridge", ridge=0.05), ref)
    # ridge_to_mean: the prior lam sum_i ||T - T_i||^2
    extra = [(lam.sqrt() * torch.eye(d, dtype=D), lam.sqrt() * t.T) for t in ts]
    ref = _lstsq(xs, ts, extra)
    torch.testing.assert_close(lot_closed_form(ts, grams, "ridge_to_mean", ridge=0.05), ref)
    # in directions no exemplar reaches (the null space of sum G, 3 of 18 here), ridge_to_mean
    # keeps the mean task vector, pinv and ridge leave the pretrained weight (no update)
    w, v = torch.linalg.eigh(sum(grams))
    null = v[:, w < 1e-9 * w.max()]
    assert null.shape[1] == d - 15
    mean = torch.stack(ts).mean(0)
    to_mean = lot_closed_form(ts, grams, "ridge_to_mean", ridge=0.05)
    torch.testing.assert_close(to_mean @ null, mean @ null)
    for reg in ("pinv", "ridge"):
        got = lot_closed_form(ts, grams, reg, ridge=0.05) @ null
        torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=1e-9)


def test_accumulator_joint_bias_and_norms_are_drift_minimisers():
    g = torch.Generator().manual_seed(5)
    k, d, out = 3, 7, 4
    xs = [torch.randn(n, d, generator=g, dtype=D) + i for i, n in enumerate([20, 30, 25])]
    tvs = []
    for _ in range(k):
        tvs.append(
            {
                "lin.weight": torch.randn(out, d, generator=g, dtype=D),
                "lin.bias": torch.randn(out, generator=g, dtype=D),
                "ln.weight": torch.randn(d, generator=g, dtype=D),
                "ln.bias": torch.randn(d, generator=g, dtype=D),
                "emb": torch.randn(3, generator=g, dtype=D),
            }
        )
    acc = LOTAccumulator(
        {"lin": LinearSpec("lin.weight", "lin.bias")}, {"ln": NormSpec("ln.weight", "ln.bias")}
    )
    xhats = [nn.functional.layer_norm(x, (d,)) for x in xs]
    for x, xh, tv in zip(xs, xhats, tvs, strict=True):
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1)
        acc.add_task(tv, {"lin": xa.T @ xa / len(x)}, {"ln": ((xh**2).mean(0), xh.mean(0))})
    merged = acc.finalize()
    # linear: weight and bias jointly = least squares on inputs augmented with a ones column
    xas = [torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1) for x in xs]
    ref = _lstsq(xas, [torch.cat([t["lin.weight"], t["lin.bias"][:, None]], 1) for t in tvs])
    torch.testing.assert_close(merged["lin.weight"], ref[:, :-1])
    torch.testing.assert_close(merged["lin.bias"], ref[:, -1])
    # norm scale: per dimension, argmin_g sum_i mean_rows ((g - g_i) xhat_i)^2, solved directly
    for j in range(d):
        a = torch.cat([xh[:, j : j + 1] / len(xh) ** 0.5 for xh in xhats])
        b = torch.cat(
            [
                xh[:, j : j + 1] * t["ln.weight"][j] / len(xh) ** 0.5
                for xh, t in zip(xhats, tvs, strict=True)
            ]
        )
        assert merged["ln.weight"][j] == pytest.approx(
            float(torch.linalg.lstsq(a, b).solution), rel=1e-9
        )
    # norm shift: the drift is stationary in the shift (its gradient vanishes) given that scale
    shift = merged["ln.bias"].clone().requires_grad_(True)
    drift = sum(
        (((merged["ln.weight"] - t["ln.weight"]) * xh + shift - t["ln.bias"]) ** 2).mean(0).sum()
        for xh, t in zip(xhats, tvs, strict=True)
    )
    (grad,) = torch.autograd.grad(drift, shift)
    assert grad.abs().max() < 1e-10
    # everything else: the mean task vector
    torch.testing.assert_close(merged["emb"], torch.stack([t["emb"] for t in tvs]).mean(0))
    # the pure helpers agree with the accumulator
    e = [(xh**2).mean(0) for xh in xhats]
    scale = lot_norm_scale([t["ln.weight"] for t in tvs], e)
    torch.testing.assert_close(scale, merged["ln.weight"])
    shift2 = lot_norm_shift([t["ln.bias"] for t in tvs], [t["ln.weight"] for t in tvs], scale,
                            [xh.mean(0) for xh in xhats])  # fmt: skip
    torch.testing.assert_close(shift2, merged["ln.bias"])


def test_feature_drift_formula():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(13, 5, generator=g, dtype=D)
    delta = torch.randn(3, 5, generator=g, dtype=D)
    assert feature_drift(delta, x.T @ x / 13) == pytest.approx(
        float((x @ delta.T).pow(2).sum() / 13)
    )


def test_exemplar_draw_is_seeded_per_task():
    a = exemplar_indices(1000, 32, 0, "mnist")
    assert len(a) == 32 and len(set(a.tolist())) == 32 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, exemplar_indices(1000, 32, 0, "mnist"))
    assert not np.array_equal(a, exemplar_indices(1000, 32, 1, "mnist"))
    assert not np.array_equal(a, exemplar_indices(1000, 32, 0, "svhn"))
    assert np.array_equal(exemplar_indices(10, 32, 0, "x"), np.arange(10))


@pytest.mark.parametrize(
    "kwargs", [{"regularization": "lu"}, {"bias": "drop"}, {"norms": "x"}, {"num_exemplars": 0}]
)
def test_bad_options_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        LOTMergingAlgorithm(**kwargs)
