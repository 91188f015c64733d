"""The cost-conscious diagnostics (batched kernels, Gram eigenvalues, trace identities, streamed
layers, θ_0 statistics and their disk cache) against the straightforward formulas: full SVD of the
full matrix and explicit commutator products, in numpy float64."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fusion_bench_larv import veneer
from fusion_bench_larv.diagnostics import (
    commutator_conflicts,
    entropies,
    exact_energies,
    frobenius_sq,
    randomized_energies,
    singular_values,
    small_gram,
)
from fusion_bench_larv.layers import group_layers
from fusion_bench_larv.settings import LarvSettings
from fusion_bench_larv.stats_cache import Theta0Stats, content_key
from fusion_bench_larv.veneer import _LazyDelta, compute_larv_scales, gate_scores, layer_diagnostics

SHAPES = [(12, 12), (40, 9), (9, 40), (33, 16)]


# -- the straightforward formulas ------------------------------------------------------------------
def naive_reff(a: np.ndarray) -> float:
    s = np.linalg.svd(a, compute_uv=False)
    p = s**2 / np.sum(a * a)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def naive_conflict(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> float:
    den = np.linalg.norm(x) * np.linalg.norm(y) + eps
    if x.shape[0] == x.shape[1]:
        return float(np.linalg.norm(x @ y - y @ x) / den)
    left = np.linalg.norm(x @ y.T - y @ x.T)  # the m×m product, formed
    right = np.linalg.norm(x.T @ y - y.T @ x)  # the n×n product, formed
    return float(0.5 * left / den + 0.5 * right / den)


def structured(shape, rng, rank=3, noise=0.05):
    m, n = shape
    return rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) + noise * rng.normal(size=shape)


# -- batched kernels -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_spectrum_entropy_and_conflict_match_naive(shape, batch, dtype):
    rng = np.random.default_rng(sum(shape))
    b = 1 if batch is None else batch
    xs = [rng.normal(size=shape) for _ in range(b)]
    ys = [structured(shape, rng) * 1e-2 for _ in range(b)]
    x = torch.tensor(np.stack(xs), dtype=dtype)
    y = torch.tensor(np.stack(ys), dtype=dtype)
    if batch is None:  # unbatched use: a stack of one
        x, y = x[:1], y[:1]
    rtol = 1e-9 if dtype == torch.float64 else 2e-4
    k = min(shape)
    for i in range(x.shape[0]):
        # σ² from the smaller Gram == squared singular values of the full matrix
        sig = np.linalg.svd(xs[i], compute_uv=False)
        got = exact_energies(x)[i].numpy()
        assert got.shape == (k,)
        np.testing.assert_allclose(got, sig**2, rtol=rtol, atol=rtol * sig[0] ** 2)
    assert small_gram(x).shape == (x.shape[0], k, k)
    r = entropies(exact_energies(x), frobenius_sq(x)).exp()
    c = commutator_conflicts(x, y)
    for i in range(x.shape[0]):
        assert float(r[i]) == pytest.approx(naive_reff(xs[i]), rel=rtol)
        assert float(c[i]) == pytest.approx(naive_conflict(xs[i], ys[i]), rel=rtol, abs=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_conflict_reuses_given_grams_and_norms(shape):
    rng = np.random.default_rng(5)
    x = torch.tensor(np.stack([rng.normal(size=shape) for _ in range(2)]))
    y = torch.tensor(np.stack([structured(shape, rng) for _ in range(2)]))
    plain = commutator_conflicts(x, y)
    reused = commutator_conflicts(
        x, y, gram_x=small_gram(x), gram_y=small_gram(y), fro2_x=frobenius_sq(x),
        fro2_y=frobenius_sq(y),
    )  # fmt: skip
    torch.testing.assert_close(reused, plain, rtol=1e-12, atol=1e-14)


def test_batched_randomized_equals_single_matrix_path():
    rng = np.random.default_rng(2)
    a = torch.tensor(np.stack([structured((50, 20), rng) for _ in range(3)]))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batched = randomized_energies(a, 2, 10, gens)
    for i, s in enumerate((1, 2, 3)):
        single = singular_values(a[i], "randomized", 2, 10, torch.Generator().manual_seed(s))
        torch.testing.assert_close(batched[i], single.pow(2), rtol=1e-10, atol=0)


def test_entropy_is_zero_for_zero_matrix():
    z = torch.zeros(2, 5, 3, dtype=torch.float64)
    assert entropies(exact_energies(z), frobenius_sq(z)).tolist() == [0.0, 0.0]


# -- layer diagnostics against per-matrix naive formulas ----------------------------------------
def make_pair(num_layers=4, seed=0):
    rng = np.random.default_rng(seed)
    theta0, merged = {"embed.weight": torch.randn(10, 8)}, {}
    for i in range(num_layers):
        for name, shape in (("q", (8, 8)), ("k", (8, 8)), ("fc1", (24, 8)), ("fc2", (8, 24))):
            theta0[f"layers.{i}.{name}.weight"] = torch.tensor(rng.normal(size=shape)).float()
        theta0[f"layers.{i}.conv.weight"] = torch.tensor(rng.normal(size=(6, 2, 2, 2))).float()
        theta0[f"layers.{i}.fc1.bias"] = torch.zeros(24)
    for k, v in theta0.items():
        d = structured(v.reshape(v.shape[0], -1).shape, rng, rank=2, noise=0.1 + 0.1 * len(k) % 3)
        merged[k] = v + 0.02 * torch.tensor(d).float().reshape(v.shape)
    return theta0, merged


def naive_layers(theta0, merged, settings, exact_delta=False):
    names = [k for k, v in theta0.items() if v.is_floating_point()]
    groups = group_layers(names, settings.layer_pattern)
    e_l, c_l = [], []
    for members in groups.members:
        e_v, c_v = [], []
        for k in members:
            if theta0[k].ndim < 2:
                continue
            x = theta0[k].double().reshape(theta0[k].shape[0], -1).numpy()
            if exact_delta:  # float64 models: Δ in float64
                y = (merged[k].double() - theta0[k].double()).reshape(x.shape).numpy()
            else:  # LARV forms Δ of a float32 model in float32
                y = (merged[k].float() - theta0[k].float()).double().reshape(x.shape).numpy()
            if settings.spectrum == "exact":
                r0, rd = naive_reff(x), naive_reff(y)
            else:  # the literal single-matrix path: one generator, θ_0's sketch first, then Δ's
                g = torch.Generator().manual_seed(veneer._matrix_seed(settings.seed, k))
                s0 = singular_values(torch.tensor(x), "randomized", settings.rank, 10, g).numpy()
                sd = singular_values(torch.tensor(y), "randomized", settings.rank, 10, g).numpy()
                p0, pd = s0**2 / np.sum(x * x), sd**2 / np.sum(y * y)
                if settings.spectrum_tail == "uniform":  # the residual as d equal eigenvalues
                    d = min(x.shape) - len(s0)
                    p0 = np.concatenate([p0, np.full(d, (1 - p0.sum()) / d)])
                    pd = np.concatenate([pd, np.full(d, (1 - pd.sum()) / d)])
                r0, rd = np.exp(-(p0 * np.log(p0)).sum()), np.exp(-(pd * np.log(pd)).sum())
            e_v.append(r0 / (rd + settings.eps))
            c_v.append(naive_conflict(x, y, settings.eps))
        e_l.append(float(np.mean(e_v)))
        c_l.append(float(np.mean(c_v)))
    return e_l, c_l


@pytest.mark.parametrize(
    "spectrum,tail", [("exact", "none"), ("randomized", "none"), ("randomized", "uniform")]
)
def test_layer_diagnostics_match_naive_formulas(spectrum, tail):
    theta0, merged = make_pair()
    s = LarvSettings(spectrum=spectrum, spectrum_tail=tail)
    e_ref, c_ref = naive_layers(theta0, merged, s)
    res = compute_larv_scales(theta0, merged, s, progress=False)
    e = [rec.e for rec in res.layers]
    c = [rec.c for rec in res.layers]
    np.testing.assert_allclose(e, e_ref, rtol=1e-4)
    np.testing.assert_allclose(c, c_ref, rtol=1e-4)
    # the tiered gate depends on the order of w only: the scales are the same, bit for bit
    _, s_ref, _ = gate_scores(e_ref, c_ref, s)
    assert res.scales == s_ref


def test_float64_models_are_diagnosed_in_float64():
    # Δ is formed in the model's compute dtype: a float64 model matches the float64 formulas to
    # round-off (a float32 Δ would leave ~1e-6 relative errors)
    theta0, merged = make_pair(seed=8)
    theta0 = {k: v.double() for k, v in theta0.items()}
    rng = np.random.default_rng(9)
    merged = {
        k: theta0[k] + 1e-3 * torch.tensor(rng.normal(size=v.shape)) for k, v in merged.items()
    }
    s = LarvSettings()
    e_ref, c_ref = naive_layers(theta0, merged, s, exact_delta=True)
    res = compute_larv_scales(theta0, merged, s, progress=False)
    np.testing.assert_allclose([r.e for r in res.layers], e_ref, rtol=1e-9)
    np.testing.assert_allclose([r.c for r in res.layers], c_ref, rtol=1e-9)


def test_streaming_in_small_chunks_gives_the_same_result(monkeypatch):
    theta0, merged = make_pair(num_layers=6, seed=3)
    s = LarvSettings()
    whole = compute_larv_scales(theta0, merged, s, progress=False)
    monkeypatch.setattr(veneer, "CHUNK_BYTES", 1)  # one layer per batch
    chunked = compute_larv_scales(theta0, merged, s, progress=False)
    assert [r.e for r in chunked.layers] == pytest.approx([r.e for r in whole.layers], rel=1e-12)
    assert [r.c for r in chunked.layers] == pytest.approx([r.c for r in whole.layers], rel=1e-12)
    assert chunked.scales == whole.scales


def test_lazy_delta_is_the_update_and_holds_no_copy():
    theta0, merged = make_pair(num_layers=1)
    lazy = _LazyDelta(theta0, merged, list(theta0))
    k = "layers.0.fc1.weight"
    torch.testing.assert_close(lazy[k], merged[k] - theta0[k], rtol=0, atol=0)
    assert len(lazy) == len(theta0) and not vars(lazy).get("_cache")


# -- θ_0 statistics: reuse and disk cache ---------------------------------------------------------
@pytest.mark.parametrize("spectrum", ["exact", "randomized"])
def test_cached_theta0_stats_give_the_same_result(tmp_path, spectrum):
    theta0, merged = make_pair(seed=4)
    plain = compute_larv_scales(theta0, merged, LarvSettings(spectrum=spectrum), progress=False)
    s = LarvSettings(spectrum=spectrum, stats_cache_dir=str(tmp_path))
    first = compute_larv_scales(theta0, merged, s, progress=False)  # computes, writes the cache
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("larv-theta0-")
    second = compute_larv_scales(theta0, merged, s, progress=False)  # reads it
    for res in (first, second):
        assert [r.e for r in res.layers] == pytest.approx([r.e for r in plain.layers], rel=1e-12)
        assert [r.c for r in res.layers] == pytest.approx([r.c for r in plain.layers], rel=1e-12)
        assert res.scales == plain.scales

    # the same θ_0 with another merge: a hit (no new file); a reusable in-process object too
    other = {k: theta0[k] + 0.5 * (v - theta0[k]) for k, v in merged.items()}
    compute_larv_scales(theta0, other, s, progress=False)
    assert os.listdir(tmp_path) == files
    stats = Theta0Stats.empty(s)
    a = compute_larv_scales(theta0, other, LarvSettings(spectrum=spectrum), theta0_stats=stats)
    assert len(stats) == 4 * 5 and stats.gram  # filled on first use: 5 matrices per layer
    b = compute_larv_scales(theta0, other, LarvSettings(spectrum=spectrum), theta0_stats=stats)
    assert [r.e for r in a.layers] == [r.e for r in b.layers]


def test_changed_theta0_or_settings_miss_the_cache(tmp_path):
    theta0, merged = make_pair(seed=6)
    s = LarvSettings(stats_cache_dir=str(tmp_path))
    names = [k for k, v in theta0.items() if v.ndim >= 2 and k.startswith("layers.")]
    key = content_key(theta0, names, s)
    compute_larv_scales(theta0, merged, s, progress=False)
    changed = dict(theta0)
    changed["layers.2.q.weight"] = theta0["layers.2.q.weight"].clone()
    changed["layers.2.q.weight"][0, 0] += 1e-3
    assert content_key(changed, names, s) != key
    rand = content_key(theta0, names, LarvSettings(spectrum="randomized"))
    assert rand != key
    assert (
        content_key(theta0, names, LarvSettings(spectrum="randomized", spectrum_tail="uniform"))
        != rand
    )
    res = compute_larv_scales(changed, merged, s, progress=False)
    assert len(os.listdir(tmp_path)) == 2  # a miss: computed and cached under the new key
    ref = compute_larv_scales(changed, merged, LarvSettings(), progress=False)
    assert [r.e for r in res.layers] == pytest.approx([r.e for r in ref.layers], rel=1e-12)


def test_stats_from_other_settings_are_refused():
    theta0, merged = make_pair(num_layers=2)
    names = [k for k, v in theta0.items() if v.is_floating_point()]
    stats = Theta0Stats.empty(LarvSettings(spectrum="randomized"))
    with pytest.raises(ValueError, match="θ_0 statistics were computed with"):
        layer_diagnostics(
            theta0, _LazyDelta(theta0, merged, names), group_layers(names), LarvSettings(),
            progress=False, stats=stats,
        )  # fmt: skip


def test_bad_cache_setting_is_rejected():
    with pytest.raises(ValueError, match="stats_cache_dir"):
        LarvSettings(stats_cache_dir=3)


@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e3])
def test_exact_energies_at_the_scale_of_fine_tuning_updates(scale):
    # the Gram is normalised to unit trace before the eigen-solve (speed), then scaled back
    rng = np.random.default_rng(9)
    a = structured((48, 16), rng, rank=4, noise=0.2) * scale
    got = exact_energies(torch.tensor(a, dtype=torch.float32)[None])[0].numpy()
    ref = np.linalg.svd(a, compute_uv=False) ** 2
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * ref[0])


@pytest.mark.parametrize("tail", ["none", "uniform"])
def test_randomized_float64_warm_stats_give_the_cold_result(tail):
    # with θ_0's statistics known, θ_0's sketch is replayed in its own dtype (float64 here) before
    # Δ's is drawn: the result is the same as when they are computed in the same call
    theta0, merged = make_pair(seed=5)
    theta0 = {k: v.double() for k, v in theta0.items()}
    merged = {k: v.double() for k, v in merged.items()}
    s = LarvSettings(spectrum="randomized", spectrum_tail=tail, seed=2)
    cold = compute_larv_scales(theta0, merged, s, progress=False)
    stats = Theta0Stats.empty(s)
    compute_larv_scales(theta0, merged, s, progress=False, theta0_stats=stats)
    warm = compute_larv_scales(theta0, merged, s, progress=False, theta0_stats=stats)
    assert [r.e for r in warm.layers] == [r.e for r in cold.layers]
    assert [r.c for r in warm.layers] == [r.c for r in cold.layers]


def test_theta0_stats_store_and_stack_round_trip():
    from fusion_bench_larv.diagnostics import SpectrumOptions, theta0_statistics

    x = torch.randn(3, 10, 4, dtype=torch.float64)
    s = theta0_statistics(x, SpectrumOptions())
    stats = Theta0Stats.empty(LarvSettings())
    names = ["a", "b", "c"]
    stats.store(names, s, grams=False)
    assert len(stats) == 3 and not stats.gram
    stats.store(names, s)
    back = stats.stacked(names, "cpu")
    assert torch.equal(back.fro2, s.fro2) and torch.equal(back.r_eff, s.r_eff)
    assert torch.equal(back.gram, s.gram)
    square = theta0_statistics(torch.randn(2, 5, 5), SpectrumOptions())
    stats.store(["p", "q"], square)
    assert square.gram is None and stats.stacked(["p", "q"], "cpu").gram is None


def test_stats_cache_is_written_atomically(tmp_path, monkeypatch):
    from fusion_bench_larv import stats_cache

    theta0, _ = make_pair(num_layers=1)
    s = LarvSettings()
    stats = Theta0Stats.empty(s)
    stats.key = "k0"
    stats.fro2["w"], stats.r_eff["w"] = 2.0, 1.5
    path = stats_cache.save_stats(tmp_path, stats)
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary left behind
    assert stats_cache.load_stats(tmp_path, "k0", s).r_eff == {"w": 1.5}

    def broken(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    stats.key = "k1"
    monkeypatch.setattr(stats_cache.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        stats_cache.save_stats(tmp_path, stats)
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # nothing half-written
