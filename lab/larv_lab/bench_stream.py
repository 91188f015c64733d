"""LARV's extra memory on a decoder LLM (docs/causal-lm.md, "Memory"): the peak memory of
FusionBench's Task Arithmetic for causal LMs alone and wrapped by LARV, on a lazily loaded
``CausalLMPool`` of a random Llama of about 1.1 B parameters (TinyLlama-1.1B's shape) and two
"fine-tuned" models (θ_0 plus noise whose size differs by block), all in bfloat16.

    python -m larv_lab.bench_stream                       # 1.1 B, bfloat16, CPU
    python -m larv_lab.bench_stream --size tiny --tag smoke

Three runs, each in a process of its own, in this order: the base merger alone; LARV streaming
θ_0 from its checkpoint files (what a lazy pool gets); LARV holding a copy of θ_0 (the path every
pool took before, ``open_theta0(stream=False)``). The peak of each is the largest ``RssAnon``
(sampled every 10 ms, after the imports and the pool's construction) minus its value then: the
memory the run allocated, all allocators included. Beside it, ``VmHWM`` (reset through
``/proc/self/clear_refs``) minus ``VmRSS``: resident memory, which also counts the pages of the
checkpoint files that the lazy state dicts map (safetensors), pages the kernel can drop. The figures: the
ratio of LARV's peak to the base merger's, and LARV's extra peak in blocks (one decoder layer
of θ_0 in bfloat16) and in model copies. The checkpoints are built once under ``--cache``
(about 2.2 GB a model at 1.1 B) and reused.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .bench_cost import _status

SIZES = {  # LlamaConfig keys; "1b" is TinyLlama-1.1B's shape (untied head)
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
TASKS = ("math", "code")
MODES = ("base", "larv-streamed", "larv-copy")
#: the base merger: FusionBench's own config, with nothing saved
BASE_CONFIG = "method/linear/task_arithmetic_for_causallm.yaml"
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}  # safetensors dtype names
DEFAULT_CACHE = Path.home() / ".cache" / "fusion-bench-larv" / "bench_stream"


class AnonPeak(threading.Thread):
    """The largest ``RssAnon`` of this process (its own memory, not the checkpoint pages the lazy
    readers map, which ``VmRSS`` also counts) sampled every ``period`` seconds until stopped."""

    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        self.period, self.peak, self.done = period, _status("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(self.period)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, _status("RssAnon"))


def build(root: Path, size: str, dtype: torch.dtype) -> Path:
    """θ_0 (N(0, 0.02²) weights, norms at 1) and the task models θ_t = θ_0 + σ_t,ℓ·N(0, 1) with
    σ growing with depth ℓ differently per task, as ``<root>/<model>/model.safetensors`` plus
    ``config.json``; skipped where ``<root>/done`` exists."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (root / "done").exists():
        return root
    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                         dtype=dtype)  # fmt: skip
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    L = config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    theta0 = {}
    for k, shape in shapes.items():
        w = (
            torch.ones(shape)
            if k.endswith("norm.weight")
            else 0.02 * torch.randn(shape, generator=g)
        )
        theta0[k] = w.to(dtype)
    for name in ("_pretrained_", *TASKS):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        if name == "_pretrained_":
            state = theta0
        else:
            t = TASKS.index(name)
            state = {}
            for k, w in theta0.items():
                layer = int(k.split(".")[2]) if k.startswith("model.layers.") else L - 1
                sigma = 1e-3 * (1 + (t + 1) * layer / max(L - 1, 1))
                state[k] = (w.float() + sigma * torch.randn(w.shape, generator=g)).to(dtype)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        print(f"built {folder} ({sum(v.numel() for v in state.values()) / 1e9:.2f} B parameters)",
              flush=True)  # fmt: skip
        del state
    (root / "done").write_text("ok\n")
    return root


def base_config() -> dict:
    """FusionBench's ``linear/task_arithmetic_for_causallm`` config (its hyperparameters as
    FusionBench ships them), with ``model_save_path`` unset: the benchmark saves nothing."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(files("fusion_bench_config").joinpath(BASE_CONFIG)))
    cfg.model_save_path = None
    return OmegaConf.to_container(cfg, resolve=True)


def child(mode: str, root: Path, dtype: str) -> dict:
    """One run in this process: the peak resident set it added, its wall time, and for LARV its
    scales and how it held θ_0 (its log line). Leaves the process as it found it."""
    from unittest import mock

    from fusion_bench.modelpool import CausalLMPool
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fusion_bench_larv import LARVAlgorithm
    from fusion_bench_larv.adapter import theta0 as theta0_mod
    from fusion_bench_larv.adapter import wrapper

    pool = CausalLMPool(
        models={m: str(root / m) for m in ("_pretrained_", *TASKS)},
        tokenizer=None,
        enable_lazy_loading=True,
        model_kwargs=OmegaConf.create({"torch_dtype": dtype}),
    )
    stream = mode == "larv-streamed"
    base = base_config()
    algorithm = instantiate(base) if mode == "base" else LARVAlgorithm(base_method=base)
    held: list[str] = []  # LARV's log lines
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: held.append(record.getMessage())
    logger = logging.getLogger(wrapper.__name__)
    level = logger.level
    opener = mock.patch.object(wrapper, "open_theta0",
                               lambda *a, **k: theta0_mod.open_theta0(*a, **k, stream=stream))  # fmt: skip
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with opener:
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            rss0, anon0 = _status("VmRSS"), _status("RssAnon")
            sampler = AnonPeak()
            sampler.start()
            t0 = time.perf_counter()
            model = algorithm.run(pool)
            seconds = time.perf_counter() - t0
            anon = sampler.stop() - anon0
            peak = _status("VmHWM") - rss0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    out = {"mode": mode, "peak_bytes": anon, "peak_resident_bytes": peak, "seconds": seconds,
           "rss_before": rss0}  # fmt: skip
    if mode != "base":
        out["scales"] = [rec["s"] for rec in algorithm.last_report["layers"]]
        out["theta0"] = next((m for m in held if "θ_0" in m), None)
    out["checksum"] = float(sum(p.detach().float().sum() for p in model.parameters()))
    return out


def block_bytes(root: Path) -> tuple[int, int]:
    """(bytes of the largest decoder layer of θ_0, bytes of θ_0), as stored."""
    from safetensors import safe_open

    per_layer: dict[int, int] = {}
    total = 0
    with safe_open(str(root / "_pretrained_" / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            n = 1
            for d in t.get_shape():
                n *= d
            nbytes = n * ITEMSIZE[t.get_dtype()]
            total += nbytes
            if k.startswith("model.layers."):
                i = int(k.split(".")[2])
                per_layer[i] = per_layer.get(i, 0) + nbytes
    return max(per_layer.values()), total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--tag", default=None, help="results file name (default stream-cpu-<size>)")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "benchmarks" / "results"
    )
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dtype = "bfloat16"
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.root, dtype)), flush=True)
        return 0
    root = build(args.cache / f"{args.size}-{dtype}", args.size, getattr(torch, dtype))
    block, model_bytes = block_bytes(root)
    runs = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for mode in args.modes:
        print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {mode} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "larv_lab.bench_stream", "--child", mode, "--root", str(root)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"the {mode} run failed (exit {proc.returncode})")
        runs[mode] = json.loads(lines[-1][len("RESULT ") :])
        r = runs[mode]
        print(f"  peak added {r['peak_bytes'] / 2**30:.2f} GiB (resident, mapped files included: "
              f"{r['peak_resident_bytes'] / 2**30:.2f} GiB) in {r['seconds']:.0f} s", flush=True)  # fmt: skip
    gib = 2**30
    result = {
        "size": args.size, "dtype": dtype, "tasks": len(TASKS), "block_bytes": block,
        "model_bytes": model_bytes, "runs": runs, "host": platform.node(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m larv_lab.bench_stream " + " ".join(argv or sys.argv[1:]),
    }  # fmt: skip
    lines = [f"# LARV's extra memory, {args.size} random Llama ({model_bytes / 1e9:.2f} GB of "
             f"θ_0 in {dtype}, one block {block / 2**20:.0f} MiB), Task Arithmetic, lazy pool",
             "", f"`{result['command']}` ({result['when']}, torch {torch.__version__})", "",
             "| run | peak memory added (GiB) | ÷ base | extra over base (blocks) | (model copies) "
             "| resident, mapped files included (GiB) | ÷ base | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    base = runs.get("base")
    for mode, r in runs.items():
        if base is not None:
            extra = r["peak_bytes"] - base["peak_bytes"]
            ratio, blocks, copies = (f"{r['peak_bytes'] / base['peak_bytes']:.3f}",
                                     f"{extra / block:.2f}", f"{extra / model_bytes:.3f}")  # fmt: skip
            resident = f"{r['peak_resident_bytes'] / base['peak_resident_bytes']:.3f}"
            result[f"ratio_{mode}"] = r["peak_bytes"] / base["peak_bytes"]
            result[f"extra_blocks_{mode}"] = extra / block
        else:
            ratio = blocks = copies = resident = "—"
        lines.append(f"| {mode} | {r['peak_bytes'] / gib:.2f} | {ratio} | {blocks} | {copies} | "
                     f"{r['peak_resident_bytes'] / gib:.2f} | {resident} | {r['seconds']:.0f} |")  # fmt: skip
    if "larv-streamed" in runs and "larv-copy" in runs:
        same = runs["larv-streamed"]["checksum"] == runs["larv-copy"]["checksum"]
        same &= runs["larv-streamed"]["scales"] == runs["larv-copy"]["scales"]
        result["streamed_equals_copy"] = same
        lines += ["", f"Streamed and copied θ_0 give the same scales and weight checksum: {same}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"stream-cpu-{args.size}"
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{tag}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
