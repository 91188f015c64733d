"""θ_0's per-matrix statistics (fusion_bench_larv.core.stats_cache): reuse within a process, the disk
cache (content key, settings check, atomic write) and the same result warm as cold."""

from __future__ import annotations

import os

import pytest
import torch
from oracles import make_pair

from fusion_bench_larv.core.layers import group_layers
from fusion_bench_larv.core.settings import LarvSettings
from fusion_bench_larv.core.stats_cache import Theta0Stats, content_key
from fusion_bench_larv.core.veneer import _LazyDelta, compute_larv_scales, layer_diagnostics


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
    from fusion_bench_larv.core.diagnostics import SpectrumOptions, theta0_statistics

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
    from fusion_bench_larv.core import stats_cache

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
