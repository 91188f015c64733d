"""LARV over FusionBench's causal-LM route (docs/causal-lm.md), on tiny random Llama, Qwen2 and
Mistral pools built here and loaded lazily, as FusionBench's ``CausalLMPool`` configs load them
(``enable_lazy_loading: true``). Qwen2's is tied and bfloat16, as Qwen2.5-1.5B; Mistral's is
sharded. One ``fusion_bench`` multirun (the three ``larv_*_for_causallm`` configs × the three
pools) saves nine checkpoints; each is checked against θ_0 + s_ℓ·Δθ computed from the saved files
alone (Δθ by Task Arithmetic and simple averaging written out, TIES by FusionBench's own
functions; s_ℓ from ``larv_layers.json``). In process: a lazy pool gives what the same pool loaded
eagerly gives, for both placements."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from fusion_bench.method.ties_merging.ties_merging_utils import (
    state_dict_to_vector,
    ties_merging,
    vector_to_state_dict,
)
from fusion_bench.modelpool import CausalLMPool
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fusion_bench_larv import LARVAlgorithm
from fusion_bench_larv.core.settings import LarvSettings
from fusion_bench_larv.core.veneer import compute_larv_scales
from fusion_bench_larv.errors import LarvConfigError

L = 4  # blocks of every tiny model
# architecture -> (config class name, its extra config, dtype the pool loads in, shard size)
ARCHS = {
    "llama": ("LlamaConfig", {}, "float32", None),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, "bfloat16", None),
    "mistral": ("MistralConfig", {"sliding_window": 16}, "float32", "40KB"),
}
# method config -> the merger it wraps ("ta", "ties", "sa")
METHODS = {
    "larv_ta_for_causallm": "ta",
    "larv_ties_for_causallm": "ties",
    "larv_simple_average_for_causallm": "sa",
}
TASKS = ("math", "code")


def _save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary (the mergers save the pool's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(47)} | {"<unk>": 47}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="w0"
    ).save_pretrained(folder)


def _build_pool(root: Path, arch: str, seed: int) -> Path:
    """θ_0 (random init) and two 'fine-tuned' models (θ_0 plus noise whose size differs by task
    and by block, so the blocks' diagnostics differ), saved as float32 safetensors."""
    import transformers

    cls_name, extra, _, shard = ARCHS[arch]
    config = getattr(transformers, cls_name)(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = root / arch
    model.save_pretrained(folder / "_pretrained_", max_shard_size=shard or "5GB")
    _save_tokenizer(folder / "_pretrained_")
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 100)
    for t, task in enumerate(TASKS):
        with torch.no_grad():
            for name, p in model.named_parameters():
                block = re.match(r"model\.layers\.(\d+)\.", name)
                size = 0.3 * (1 + t) * (1 + (int(block[1]) if block else 0)) / L
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(theta0[name] + size * theta0[name].std().clamp_min(0.02) * noise)
        model.save_pretrained(folder / task)
        model.load_state_dict(theta0)
    return folder


def _pool_yaml(folder: Path, arch: str) -> str:
    models = "\n".join(f"  {m}: {folder / m}" for m in ("_pretrained_", *TASKS))
    return (
        "_target_: fusion_bench.modelpool.CausalLMPool\n_recursive_: false\n"
        f"enable_lazy_loading: true\nmodels:\n{models}\n"
        f"model_kwargs:\n  torch_dtype: {ARCHS[arch][2]}\ntokenizer: {folder / '_pretrained_'}\n"
    )


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The three tiny pools and a config folder with a FusionBench model pool config for each
    (``modelpool=larv_tiny/<arch>``)."""
    root = tmp_path_factory.mktemp("causal_lm")
    folders = {arch: _build_pool(root / "models", arch, i) for i, arch in enumerate(ARCHS)}
    cfg = root / "config" / "modelpool" / "larv_tiny"
    cfg.mkdir(parents=True)
    for arch, folder in folders.items():
        (cfg / f"{arch}.yaml").write_text(_pool_yaml(folder, arch))
    return root, folders


@pytest.fixture(scope="module")
def cli_runs(pools) -> Path:
    """One ``fusion_bench`` multirun, every method config on every pool, offline; run ``r`` logs
    to ``<root>/runs/<method>/<arch>``."""
    root, _ = pools
    exe = Path(sys.executable).with_name("fusion_bench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        str(exe), "--config-dir", str(root / "config"), "-m",
        f"method={','.join(METHODS)}", f"modelpool={','.join(f'larv_tiny/{a}' for a in ARCHS)}",
        "taskpool=dummy", "fabric.accelerator=cpu", "print_config=false",
        f"path.log_dir={root}/runs/${{hydra:runtime.choices.method}}/"
        "${hydra:runtime.choices.modelpool}",
        f"hydra.sweep.dir={root}/multirun",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root / "runs"


def read_folder(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model (all its safetensors shards), in ``dtype`` if given."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return {k: v.to(dtype) if dtype else v for k, v in out.items()}


def expected_merge(
    merger: str, theta0: dict, tasks: list[dict], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """θ_merged from the saved files: Task Arithmetic (λ = 0.3) and simple averaging written out
    in float64; TIES (λ = 0.3, top 20 %, sum) by FusionBench's own functions, in the pool's
    dtype as FusionBench runs it on the lazy pool's names."""
    if merger == "ties":
        flat = [state_dict_to_vector({k: v.to(dtype) for k, v in sd.items()}) for sd in tasks]
        flat0 = state_dict_to_vector({k: v.to(dtype) for k, v in theta0.items()})
        merged = flat0 + 0.3 * ties_merging(torch.vstack(flat) - flat0, 20, "sum")
        return dict(vector_to_state_dict(merged, {k: v.to(dtype) for k, v in theta0.items()}))
    out = {}
    for k, t0 in theta0.items():
        t0, ts = t0.double(), [sd[k].double() for sd in tasks]
        out[k] = t0 + 0.3 * sum(t - t0 for t in ts) if merger == "ta" else sum(ts) / len(ts)
    return out


def block_of(name: str) -> int:
    """The block a parameter's scale comes from (docs/method.md): ``model.layers.N.`` is block
    N + 1, the embeddings block 1, the final norm and the head block L."""
    found = re.match(r"model\.layers\.(\d+)\.", name)
    if found:
        return int(found[1]) + 1
    return 1 if "embed_tokens" in name else L


def with_tied_head(state: dict, tied: bool) -> dict:
    """A state dict under the module's names: a tied head is the embedding."""
    if tied and "lm_head.weight" not in state:
        return {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    return state


CASES = [(m, a) for m in METHODS for a in ARCHS]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "arch"), CASES)
def test_cli_saves_the_rescaled_merge(cli_runs, pools, method, arch):
    _, folders = pools
    log_dir = cli_runs / method / "larv_tiny" / arch
    report = json.loads((log_dir / "larv_layers.json").read_text())
    checkpoint = log_dir / "checkpoint"
    # LARV saved the rescaled model where the merger saves its own, and says so
    assert report["checkpoint"] == str(checkpoint)
    log = "".join(p.read_text() for p in log_dir.glob("hydra_output/*.log"))
    assert f"the rescaled model is saved to {checkpoint}" in " ".join(log.split())
    assert {"config.json", "tokenizer.json", "README.md"} <= {p.name for p in checkpoint.iterdir()}
    assert "LARV over" in (checkpoint / "README.md").read_text()

    dtype = getattr(torch, ARCHS[arch][2])
    tied = arch == "qwen2"
    theta0 = read_folder(folders[arch] / "_pretrained_", dtype)
    tasks = [read_folder(folders[arch] / t, dtype) for t in TASKS]
    merged = expected_merge(METHODS[method], theta0, tasks, dtype)
    saved = read_folder(checkpoint)
    assert set(saved) == set(theta0)  # a tied head is saved once, as the embedding
    assert all(v.dtype == dtype for v in saved.values())

    s = {rec["index"]: rec["s"] for rec in report["layers"]}
    assert len(s) == L and len(set(s.values())) > 1  # a real rescaling: not one global scale
    outside = {o["name"]: o["scale"] for o in report["outside_blocks"]}
    for name, scale in outside.items():
        # the tied head takes the embedding's scale (one tensor, one scale)
        want = s[1] if tied and name == "lm_head.weight" else s[block_of(name)]
        assert scale == want, name
    # float32: rounding only; bfloat16: a few units of the last place of the weights
    eps = {torch.float32: 2**-20, torch.bfloat16: 2**-6}[dtype]
    shifted = set()
    for name, got in saved.items():
        t0, m, sc = theta0[name].double(), merged[name].double(), s[block_of(name)]
        atol = eps * float(max(t0.abs().max(), m.abs().max()))
        want = t0 + sc * (m - t0)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=atol, msg=name)
        if sc != 1.0 and (got.double() - m).abs().max() > 10 * atol:
            shifted.add(block_of(name))
    assert shifted  # a checkpoint of the un-rescaled merge would fail this test

    # the report's scales are LARV's on θ_0 and the merge from the files, names as the module's
    settings = LarvSettings.from_mapping(report["settings"])
    ref = compute_larv_scales(
        with_tied_head(theta0, tied),
        with_tied_head({k: v.to(dtype) for k, v in merged.items()}, tied),
        settings,
    )
    assert ref.scales == [s[i] for i in range(1, L + 1)]
    for rec, want in zip(report["layers"], ref.layers, strict=True):
        assert rec["e"] == pytest.approx(want.e, rel=1e-2)
        assert rec["c"] == pytest.approx(want.c, rel=1e-2)


def _pool(folder: Path, arch: str, lazy: bool) -> CausalLMPool:
    return CausalLMPool(
        models={m: str(folder / m) for m in ("_pretrained_", *TASKS)},
        tokenizer=None,
        enable_lazy_loading=lazy,
        # a DictConfig, as from a config file (FusionBench writes the parsed dtype into a dict)
        model_kwargs=OmegaConf.create({"torch_dtype": ARCHS[arch][2]}),
    )


# on the tied bfloat16 pool: the default placement, and per-task diagnostics (each task model
# read under θ_0's names, then every model the merger loads rewritten: a lazy one in its cache)
@pytest.mark.parametrize("keys", [{}, {"diagnostics": "per_task", "placement": "task_vectors"}])
def test_a_lazy_pool_gives_what_the_eager_pool_gives(pools, keys, tmp_path):
    """The same pool loaded lazily and eagerly: the same scales and the same weights, bit for
    bit; the model LARV returns from the lazy pool computes what its saved checkpoint computes
    (FusionBench's lazy merge leaves the tied head and the rotary buffers uninitialised)."""
    from transformers import AutoModelForCausalLM

    _, folders = pools
    base = {"_target_": "fusion_bench.method.TaskArithmeticForCausalLM", "scaling_factor": 0.3}
    runs = {}
    for lazy in (False, True):
        save = str(tmp_path / f"ckpt_{lazy}")
        larv = LARVAlgorithm(base_method={**base, "model_save_path": save}, **keys)
        model = larv.run(_pool(folders["qwen2"], "qwen2", lazy))
        runs[lazy] = (model, larv.last_report)
        assert larv.last_report["checkpoint"] == save
    (eager, eager_report), (lazy, lazy_report) = runs[False], runs[True]
    assert lazy_report["layers"] == eager_report["layers"]
    assert len({rec["s"] for rec in lazy_report["layers"]}) > 1
    eager_sd, lazy_sd = eager.state_dict(), lazy.state_dict()
    assert list(lazy_sd) == list(eager_sd)
    for k, v in eager_sd.items():
        assert torch.equal(lazy_sd[k], v), k
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight
    ids = torch.arange(12).reshape(2, 6)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt_True", dtype=lazy.dtype)
    with torch.no_grad():
        torch.testing.assert_close(lazy(ids).logits, reloaded(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(lazy(ids).logits, eager(ids).logits, rtol=0, atol=0)


def test_lines_on_a_lazy_pool(pools, tmp_path):
    """LiNeS shares the wrapper: on the tied lazy pool it reads each task vector under θ_0's
    names, gives the eager pool's weights bit for bit and saves its model where the merger
    would have."""
    from fusion_bench_larv import LiNeSAlgorithm

    _, folders = pools
    states = {}
    for lazy in (False, True):
        save = tmp_path / f"ckpt_{lazy}"
        base = {"_target_": "fusion_bench.method.TaskArithmeticForCausalLM",
                "scaling_factor": 1.0, "model_save_path": str(save)}  # fmt: skip
        alg = LiNeSAlgorithm(base_method=base, beta=0.5)
        states[lazy] = alg.run(_pool(folders["qwen2"], "qwen2", lazy)).state_dict()
        assert alg.last_report["checkpoint"] == str(save) and (save / "config.json").is_file()
    for k, v in states[False].items():
        assert torch.equal(states[True][k], v), k


def test_a_lazy_checkpoint_missing_a_parameter_is_named(pools, tmp_path):
    """θ_0 read lazily under its model's names: a tied head comes from the embedding, an untied
    one the checkpoint lacks is a LarvInputError naming it (not a KeyError mid-merge)."""
    import shutil

    from fusion_bench.utils.lazy_state_dict import LazyStateDict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from fusion_bench_larv.adapter.model_state import LazyModelState
    from fusion_bench_larv.errors import LarvInputError

    _, folders = pools
    tied = LazyModelState(LazyStateDict(str(folders["qwen2"] / "_pretrained_"),
                                        meta_module_class=AutoModelForCausalLM))  # fmt: skip
    assert tied.stored["lm_head.weight"] == "model.embed_tokens.weight"
    state = tied.copy()
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]

    broken = tmp_path / "broken"
    shutil.copytree(folders["llama"] / "_pretrained_", broken)
    weights = read_folder(broken)
    del weights["lm_head.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    lazy = LazyStateDict(str(broken), meta_module_class=AutoModelForCausalLM)
    with pytest.raises(LarvInputError, match="stores no tensor for `lm_head.weight`"):
        LazyModelState(lazy)


def test_merge_backbone(pools):
    """``merge_backbone: true`` builds a backbone pool from the pool's config (the view gives the
    inner pool's): LARV rescales the merged blocks and leaves the rest θ_0; with the placements
    that rewrite the loaded models it is refused (the backbone pool is not LARV's view)."""
    _, folders = pools
    base = {"_target_": "fusion_bench.method.TaskArithmeticForCausalLM", "scaling_factor": 0.3,
            "merge_backbone": True}  # fmt: skip
    larv = LARVAlgorithm(base_method=base)
    model = larv.run(_pool(folders["llama"], "llama", lazy=False))
    theta0 = read_folder(folders["llama"] / "_pretrained_")
    sd = model.state_dict()
    assert torch.equal(sd["lm_head.weight"], theta0["lm_head.weight"])
    assert not torch.equal(sd["model.layers.3.mlp.up_proj.weight"],
                           theta0["model.layers.3.mlp.up_proj.weight"])  # fmt: skip
    with pytest.raises(LarvConfigError, match="merge_backbone"):
        LARVAlgorithm(base_method=base, placement="task_vectors")


def _tracked(reads: dict, alive: list, peak: list):
    """``open_theta0`` whose streamed θ_0 records each read (name → count) and, at every read,
    the bytes of the θ_0 tensors it handed out that are still alive (``peak``)."""
    from fusion_bench_larv.adapter import theta0 as theta0_mod
    from fusion_bench_larv.core.state import StreamedState

    def open_tracked(*args, **kwargs):
        state, how = theta0_mod.open_theta0(*args, **kwargs)
        if isinstance(state, StreamedState):
            read = state._read

            def tracking(name):
                t = read(name)
                reads[name] = reads.get(name, 0) + 1
                alive[:] = [r for r in alive if r() is not None] + [weakref.ref(t)]
                held = {id(r()): r().numel() * r().element_size() for r in alive if r() is not None}
                peak[0] = max(peak[0], sum(held.values()))
                return t

            state._read = tracking
        return state, how

    return open_tracked


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_theta0_is_the_in_memory_path_bit_for_bit(pools, arch, monkeypatch, caplog):
    """On a lazy pool LARV reads θ_0 from its checkpoint files, a stack or a tensor at a time,
    instead of copying it (docs/causal-lm.md, "Memory"): the same scales and the same weights,
    bit for bit, as with the copy; after opening, each θ_0 tensor read at most twice (by the
    diagnostics, by the rescaling), and never more than two of them alive at once."""
    from fusion_bench_larv.adapter import theta0 as theta0_mod
    from fusion_bench_larv.adapter import wrapper

    _, folders = pools
    base = {"_target_": "fusion_bench.method.TaskArithmeticForCausalLM", "scaling_factor": 0.3}
    runs, reads, alive, peak = {}, {}, [], [0]
    for stream in (False, True):
        opener = _tracked(reads, alive, peak) if stream else theta0_mod.open_theta0
        monkeypatch.setattr(wrapper, "open_theta0",
                            lambda *a, opener=opener, stream=stream: opener(*a, stream=stream))  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=wrapper.__name__):
            larv = LARVAlgorithm(base_method=base)
            model = larv.run(_pool(folders[arch], arch, lazy=True))
        how = "reads θ_0 (" if stream else "keeps a copy of θ_0 in memory"
        assert how in caplog.text
        runs[stream] = (model.state_dict(), larv.last_report)
    (held, held_report), (streamed, streamed_report) = runs[False], runs[True]
    assert streamed_report == held_report
    assert len({rec["s"] for rec in streamed_report["layers"]}) > 1
    assert list(streamed) == list(held)
    for k, v in held.items():
        assert torch.equal(streamed[k], v), k

    theta0 = read_folder(folders[arch] / "_pretrained_")
    sizes = sorted(v.numel() * v.element_size() for v in theta0.values())
    assert set(reads) <= set(held) and max(reads.values()) <= 2  # after opening: two passes
    assert 0 < peak[0] <= sizes[-1] + sizes[-2] < sum(sizes) / 4


def test_a_streamed_theta0_refuses_changed_files(pools, tmp_path):
    """A checkpoint file rewritten after LARV opened θ_0 is an error at the next read; a lazy
    dict that holds its tensors (``cache_state_dict``) is not streamed, and says why."""
    import shutil

    from fusion_bench.utils.lazy_state_dict import LazyStateDict
    from transformers import AutoModelForCausalLM

    from fusion_bench_larv.adapter.theta0 import streamed
    from fusion_bench_larv.core.state import StreamedState
    from fusion_bench_larv.errors import LarvInputError

    _, folders = pools
    folder = tmp_path / "theta0"
    shutil.copytree(folders["mistral"] / "_pretrained_", folder)  # sharded
    state = streamed(LazyStateDict(str(folder), meta_module_class=AutoModelForCausalLM))
    assert isinstance(state, StreamedState) and state.checked
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(state[name], read_folder(folder)[name])
    shard = sorted(folder.glob("*.safetensors"))[-1]
    os.utime(shard, ns=(0, 0))
    with pytest.raises(LarvInputError, match="changed during the run"):
        state[name]
    cached = LazyStateDict(str(folder), meta_module_class=AutoModelForCausalLM,
                           cache_state_dict=True)  # fmt: skip
    assert "holds its tensors in memory" in streamed(cached)
