"""LOT Merging on real models: the per-layer feature drift against Task Arithmetic on the tiny CLIP
suite and the real-weights testbed (measured here with independent hooks), the testbed's
re-derived training split, and LARV over LOT with unit scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fusion_bench.method import TaskArithmeticAlgorithm
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusion_bench_larv import LARVAlgorithm
from fusion_bench_larv.methods.lot_algorithm import (
    LOTMergingAlgorithm,
    find_lot_layers,
)
from larv_lab.testbed.tiny_clip import run_fusion_bench

D = torch.float64
UNIT = {"gate": "schedule", "schedule": "uniform", "schedule_scales": [1.0]}
LOT_TARGET = "fusion_bench_larv.LOTMergingAlgorithm"


# ---------------------------------------------------------------------------- feature drift, real
def _raw_inputs(model, loader, names) -> dict[str, torch.Tensor]:
    """Inputs of the named linear layers, recorded here with plain hooks (not lot.py's)."""
    modules, seen, handles = dict(model.named_modules()), {n: [] for n in names}, []
    for n in names:
        handles.append(
            modules[n].register_forward_hook(
                lambda m, i, o, n=n: seen[n].append(i[0].detach().reshape(-1, i[0].shape[-1]))
            )
        )
    with torch.no_grad():
        for x, _ in loader:
            model(pixel_values=x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).to(D) for n, v in seen.items()}


def _drift_per_layer(pool, alg, merged_states):
    """Per linear layer: sum over tasks of mean_rows ||X_i (W - W_i)^T + (b - b_i)||^2, X_i the
    inputs expert i's layer sees on its own exemplars (the ones LOT used)."""
    linears, _ = find_lot_layers(pool.load_pretrained_model())
    drift = {name: {n: 0.0 for n in linears} for name in merged_states}
    for task in pool.model_names:
        expert = pool.load_model(task).eval()
        xs = _raw_inputs(expert, alg.exemplar_loader(pool, task), list(linears))
        ex = expert.state_dict()
        for name, sd in merged_states.items():
            for n, spec in linears.items():
                out = xs[n] @ (sd[spec.weight].to(D) - ex[spec.weight].to(D)).T
                if spec.bias is not None:
                    out = out + (sd[spec.bias].to(D) - ex[spec.bias].to(D))
                drift[name][n] += float(out.pow(2).sum(1).mean())
    return linears, drift


def _assert_lot_lowers_drift(pool, lot=None):
    """LOT (run here, or ``lot``: a state dict merged elsewhere with the default options) against
    Task Arithmetic (0.3), on every linear layer, on the exemplars LOT's defaults draw."""
    alg = LOTMergingAlgorithm()
    if lot is None:
        lot = alg.run(pool).state_dict()
        assert set(alg.last_stats["tasks"]) == set(pool.model_names)
        assert all(s["exemplars"] == 32 for s in alg.last_stats["tasks"].values())
        assert alg.last_stats["missing"] == []
    ta = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool).state_dict()
    linears, drift = _drift_per_layer(pool, alg, {"lot": lot, "ta": ta})
    for n in linears:  # LOT is the per-layer minimiser: never above TA, on every layer
        assert drift["lot"][n] <= drift["ta"][n] * (1 + 1e-6), (n, drift["lot"][n], drift["ta"][n])
    total_lot, total_ta = sum(drift["lot"].values()), sum(drift["ta"].values())
    assert total_lot < total_ta
    return drift


def _tiny_pool(suite):
    return instantiate(OmegaConf.load(suite.modelpool_config_path), _recursive_=False)


def test_lot_lowers_feature_drift_against_ta_on_tiny_clip(tiny_clip_suite):
    pool = _tiny_pool(tiny_clip_suite)
    drift = _assert_lot_lowers_drift(pool)
    # hooks reached q, k, v, out, fc1, fc2 of every block
    assert len(drift["lot"]) == 6 * tiny_clip_suite.num_layers


def test_larv_lot_with_unit_scales_equals_lot(tiny_clip_suite):
    pool = _tiny_pool(tiny_clip_suite)
    lot = LOTMergingAlgorithm(num_exemplars=16, seed=3).run(pool).state_dict()
    larv = LARVAlgorithm(
        base_method={"_target_": LOT_TARGET, "num_exemplars": 16, "seed": 3}, **UNIT
    )
    merged = larv.run(pool).state_dict()
    assert merged.keys() == lot.keys()
    for k in lot:
        assert torch.equal(merged[k], lot[k]), k
    # and LARV's default (tiered) gate does rescale LOT's update
    tiered = LARVAlgorithm(base_method={"_target_": LOT_TARGET, "num_exemplars": 16, "seed": 3})
    rescaled = tiered.run(pool).state_dict()
    assert any(not torch.equal(rescaled[k], lot[k]) for k in lot)


def test_method_configs_compose(tiny_clip_suite):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(tiny_clip_suite.config_dir), version_base=None):
            lot = compose(
                "fabric_model_fusion", ["method=lot_merging", "method.num_exemplars=8"]
            ).method
            larv = compose("fabric_model_fusion", ["method=larv_lot"]).method
    finally:
        GlobalHydra.instance().clear()
    alg = instantiate(lot, _recursive_=False)
    assert isinstance(alg, LOTMergingAlgorithm) and alg.num_exemplars == 8
    assert (alg.regularization, alg.bias, alg.norms, alg.seed) == ("pinv", "joint", "energy", 0)
    wrapper = instantiate(larv, _recursive_=False)
    assert isinstance(wrapper, LARVAlgorithm) and wrapper.gate == "tiered"
    base = wrapper.build_base_method()
    assert isinstance(base, LOTMergingAlgorithm) and base.num_exemplars == 32


# ------------------------------------------------------------------------------ real-weights testbed
@pytest.mark.slow  # builds the ci testbed (the shared session fixture)
def test_testbed_train_set_is_the_builders_split(ci_testbed, monkeypatch):
    from larv_lab.testbed import build as B
    from larv_lab.testbed import pools
    from larv_lab.testbed import toolkit as K
    from larv_lab.testbed.sources import load_source

    pool = pools.TestbedModelPool(testbed_dir=str(ci_testbed.root))
    assert pool.train_dataset_names == list(ci_testbed.tasks)
    for task in ci_testbed.tasks:
        train_x, train_y, test_x, test_y = K.split(load_source(task), ci_testbed.recipe)
        # the same call re-derives the stored test set exactly: the split is the build's
        stored_x, stored_y = ci_testbed.test_set(task)
        assert np.array_equal(test_x, stored_x) and np.array_equal(test_y, stored_y)
        ds = pool.load_train_dataset(task)
        assert len(ds) == ci_testbed.report["tasks"][task]["n_train"] == len(train_y)
        x, y = ds[len(ds) - 1]
        assert y == int(train_y[-1])
        # pre-processed exactly as the task pool pre-processes test images
        torch.testing.assert_close(
            x, B.preprocess(train_x, ci_testbed.resolution)[-1], rtol=0, atol=0
        )
    monkeypatch.setattr(pools, "source_fingerprint", lambda task: ["not-the-built-one"])
    with pytest.raises(RuntimeError, match="differs"):
        pool.load_train_dataset(ci_testbed.tasks[0])


@pytest.mark.slow
def test_cli_lot_merging_on_the_testbed_lowers_feature_drift(ci_testbed, tmp_path):
    """`fusion_bench method=lot_merging` on the testbed (exemplars from the re-derived training
    splits), then the saved merged backbone against Task Arithmetic, layer by layer."""
    from larv_lab.testbed.backbone import load_backbone
    from larv_lab.testbed.pools import TestbedModelPool

    root = str(ci_testbed.root)
    report = run_fusion_bench(
        [
            "method=lot_merging",
            "modelpool=LarvTestbed/ci",
            "taskpool=LarvTestbed/ci",
            f"modelpool.testbed_dir={root}",
            f"taskpool.testbed_dir={root}",
            f"merged_model_save_path={tmp_path / 'merged'}",
        ],
        cwd=tmp_path,
        log_dir=tmp_path / "logs",
    )
    merged = load_backbone(tmp_path / "merged")
    for task in ci_testbed.tasks:  # the report is the saved backbone's accuracy
        assert report[task]["accuracy"] == pytest.approx(
            ci_testbed.evaluate(merged, task), abs=1e-9
        )
    pool = TestbedModelPool(testbed_dir=root)
    drift = _assert_lot_lowers_drift(pool, lot=merged.state_dict())
    assert len(drift["lot"]) == 6 * 12  # DINOv2 ViT-S: q, k, v, out, fc1, fc2 in 12 blocks


@pytest.mark.slow
def test_cli_larv_lot_on_tiny_clip(tiny_clip_suite, tmp_path):
    """`fusion_bench method=larv_lot`: the saved model is LARV (tiered) over LOT, as computed in
    process, and the report is its accuracy."""
    import json

    from transformers import CLIPVisionModel

    from larv_lab.testbed.tiny_clip import zero_shot_accuracy

    log_dir = tmp_path / "logs"
    report = run_fusion_bench(
        [
            *tiny_clip_suite.cli_args(),
            "method=larv_lot",
            f"merged_model_save_path={tmp_path / 'm'}",
        ],
        cwd=tmp_path,
        log_dir=log_dir,
    )
    saved = CLIPVisionModel.from_pretrained(str(tmp_path / "m"))
    layers = json.loads((log_dir / "larv_layers.json").read_text())
    assert layers["base_method"]["_target_"] == LOT_TARGET
    assert layers["base_method"]["num_exemplars"] == 32
    assert len(layers["layers"]) == tiny_clip_suite.num_layers
    ours = LARVAlgorithm(base_method={"_target_": LOT_TARGET}).run(_tiny_pool(tiny_clip_suite))
    ref = ours.state_dict()
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-6)
    for task in tiny_clip_suite.tasks:
        acc = zero_shot_accuracy(tiny_clip_suite, task, saved)
        assert report[task]["accuracy"] == pytest.approx(acc, abs=1e-6)
