"""``larv-mergekit``: LARV's per-block scales s_ℓ as a mergekit config (docs/mergekit.md).

Reads θ_0 and the fine-tuned models (local Hugging Face folders of one causal-LM architecture,
safetensors weights), forms the base merge that mergekit's ``task_arithmetic`` or ``ties`` would
make tensor by tensor (:func:`~fusion_bench_larv.core.mergekit.merged_update`), computes LARV's
scales on θ_0 and that merge (:func:`~fusion_bench_larv.core.veneer.compute_larv_scales`) and
writes a mergekit YAML whose per-layer ``lambda`` carries them
(:func:`~fusion_bench_larv.core.mergekit.lambda_setting`). ``mergekit-yaml`` on that file then
writes θ_0 + s_ℓ·Δθ, Δθ the base merge's update, with no FusionBench in the loop.

Memory: θ_0 and the fine-tuned models are read one tensor at a time from their (memory-mapped)
files; the base merge is held whole, in float32 (mergekit's computing dtype here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from .. import __version__
from ..core.inputs import grouped_layers
from ..core.io import write_json_atomic, write_text_atomic
from ..core.mergekit import METHODS, NORMALIZE, lambda_setting, merge_config, merged_update
from ..core.settings import LarvSettings
from ..core.veneer import LarvResult, compute_larv_scales
from ..errors import LarvConfigError, LarvInputError

COMPUTE_DTYPE = torch.float32  # the `dtype: float32` every exported config sets
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}  # fmt: skip


def module_names(folder: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """The model's state-dict names in its own order (which LARV's block finder reads: the order
    of the files' keys is alphabetical and would put ``lm_head`` before the blocks), and each tied
    name → the first name of its tensor (``lm_head.weight`` → ``model.embed_tokens.weight`` when
    the embeddings are tied). The model is built on the meta device from its ``config.json``:
    no weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:  # not a causal LM transformers knows
        raise LarvInputError(
            f"{folder}: transformers builds no causal LM from its config ({err})"
        ) from err
    first: dict[int, str] = {}
    names, aliases = [], {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.append(name)
        owner = first.setdefault(id(tensor), name)
        if owner != name:
            aliases[name] = owner
    return names, aliases


class CheckpointState(Mapping):
    """A model folder's weights by name, read from its safetensors file(s) on access and never
    held: ``names`` in the module's order, a tied name read as the name it aliases."""

    def __init__(self, folder: str | os.PathLike, names: Sequence[str], aliases: Mapping[str, str]):
        self.folder = Path(folder)
        self._names, self.aliases = list(names), dict(aliases)
        self._known = set(self._names)
        self._file_of = _weight_files(self.folder)
        stored = [n for n in self._names if n not in self.aliases]
        missing = [n for n in stored if n not in self._file_of]
        if missing:
            raise LarvInputError(
                f"{self.folder} lacks {len(missing)} of its architecture's weights, e.g. "
                f"{missing[:3]}; every model must be a complete checkpoint of θ_0's architecture"
            )
        # weights the architecture does not list (e.g. an old rotary `inv_freq`): mergekit writes
        # only its architecture's weights, so LARV leaves them out too
        self.unlisted = sorted(set(self._file_of) - set(stored))
        self._handles: dict[Path, object] = {}

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        stored = self.aliases.get(name, name)
        return self._handle(self._file_of[stored]).get_tensor(stored)

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self.aliases.get(name, name)
        return tuple(self._handle(self._file_of[stored]).get_slice(stored).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _weight_files(folder: Path) -> dict[str, Path]:
    """Weight name → its safetensors file: ``model.safetensors``, or the shards of
    ``model.safetensors.index.json``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return dict.fromkeys(f.keys(), single)
    raise LarvInputError(
        f"{folder} holds no model.safetensors (nor its index): the export reads safetensors "
        "checkpoints (`model.save_pretrained(folder)` writes one)"
    )


def base_merge(
    method: str,
    theta0: CheckpointState,
    tuned: Sequence[CheckpointState],
    weights: Sequence[float],
    density: float = 1.0,
    base_lambda: float = 1.0,
) -> dict[str, torch.Tensor]:
    """θ_0 + λ·u per tensor, u as mergekit computes it in float32 (``merged_update``), one tensor
    of each model read at a time; a tied name gets the tensor of the name it aliases (so LARV
    gives both one scale), a non-floating tensor is θ_0's."""
    merged: dict[str, torch.Tensor] = {}
    for name in theta0:
        if name in theta0.aliases:
            merged[name] = merged[theta0.aliases[name]]
            continue
        t0 = theta0[name]
        if not torch.is_floating_point(t0):
            merged[name] = t0
            continue
        base = t0.to(COMPUTE_DTYPE)
        for model in tuned:
            if model.shape(name) != tuple(t0.shape):
                raise LarvInputError(
                    f"{model.folder}: {name!r} has shape {model.shape(name)}, θ_0 "
                    f"{tuple(t0.shape)}; every model must be of θ_0's architecture"
                )
        deltas = [m[name].to(COMPUTE_DTYPE) - base for m in tuned]
        u = merged_update(method, deltas, weights, density, name)
        if base_lambda != 1:  # as mergekit: `mixed_delta *= lambda`
            u *= base_lambda
        merged[name] = base + u
    return merged


def _settings(pairs: Sequence[str]) -> LarvSettings:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise LarvConfigError(f"--set takes KEY=VALUE (a LARV config key); got {pair!r}")
        values[key.strip()] = yaml.safe_load(value)
    settings = LarvSettings.from_mapping(values)
    if settings.placement != "merged" or settings.diagnostics != "merged":
        raise LarvConfigError(
            "mergekit's `lambda` rescales the merged update: the export takes `placement: merged` "
            "and `diagnostics: merged` only"
        )
    return settings


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if not weights:
        return [1.0] * n
    if len(weights) == 1:
        return list(weights) * n
    if len(weights) != n:
        raise LarvConfigError(
            f"--weight takes one value or one per model ({n}); got {len(weights)}"
        )
    return list(weights)


def export(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    base_lambda: float = 1.0,
    settings: LarvSettings | None = None,
    device: str | None = None,
) -> tuple[dict, LarvResult, dict[str, torch.Tensor]]:
    """The mergekit config (plain values) that applies LARV to the base merge of ``models`` over
    ``base``, LARV's result, and the base merge itself (θ_0 + Δθ, float32)."""
    if method not in METHODS:
        raise LarvConfigError(f"--method {method!r}: the export knows {', '.join(METHODS)}")
    if method == "ties" and (density is None or not 0 < density <= 1):
        raise LarvConfigError(
            f"ties needs --density in (0, 1] (kept share per tensor); got {density}"
        )
    if not models:
        raise LarvConfigError("give at least one fine-tuned model")
    settings = settings or LarvSettings()
    weights = _weights(weights, len(models))
    names, aliases = module_names(base)
    theta0 = CheckpointState(base, names, aliases)
    tuned = [CheckpointState(m, names, aliases) for m in models]
    merged = base_merge(method, theta0, tuned, weights, density or 1.0, base_lambda)
    result = compute_larv_scales(theta0, merged, settings, device=device)
    if theta0.unlisted:
        result.warnings.append(
            f"{len(theta0.unlisted)} weight(s) of θ_0's files are not in its architecture and "
            f"are left out, as mergekit leaves them out: {theta0.unlisted[:3]}"
        )
    floats = [n for n in names if torch.is_floating_point(merged[n])]
    groups = grouped_layers(floats, result.layer_pattern)  # the blocks compute_larv_scales used
    setting = lambda_setting(groups.prefixes, groups.members, result.param_scale, base_lambda)
    stored = {theta0[n].dtype for n in floats if n not in aliases}
    out_dtype = _DTYPE_NAMES.get(stored.pop()) if len(stored) == 1 else None
    config = merge_config(method, str(Path(base).resolve()), [str(Path(m).resolve()) for m in models],
                          weights, setting, density if method == "ties" else None,
                          _DTYPE_NAMES[COMPUTE_DTYPE], out_dtype)  # fmt: skip
    return config, result, merged


class _Dumper(yaml.SafeDumper):
    """Lists of numbers in flow style (``[0.5, 1.0, 1.5]``), as mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(v, (int, float)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def render_yaml(
    config: dict, result: LarvResult, base_lambda: float = 1.0, settings: LarvSettings | None = None
) -> str:
    """The config as YAML under a comment that says what it holds (the scales, the LARV settings
    other than the defaults) and how to run it."""
    method = config["merge_method"]
    s = ", ".join(f"{v:g}" for v in result.scales)
    lam = "s_ℓ" if base_lambda == 1 else f"{base_lambda:g}·s_ℓ"
    head = [
        f"# LARV's per-block scales over mergekit's {method} (normalize: "
        f"{str(NORMALIZE[method]).lower()}), by larv-mergekit (fusion-bench-larv {__version__})",
        f"# s_1..s_{len(result.scales)} = [{s}]: layer ℓ's lambda is {lam}; the filters give the "
        "tensors outside the layers their blocks' scales",
    ]
    if settings is not None:
        default = LarvSettings().to_dict()
        changed = [f"{k}={v}" for k, v in settings.to_dict().items() if default[k] != v]
        if changed:
            head.append(f"# LARV settings other than the defaults: {', '.join(changed)}")
    head.append(
        "# `mergekit-yaml THIS.yaml OUTPUT_DIR` writes θ_0 + s_ℓ·Δθ, Δθ = this merge's update "
        f"with lambda {base_lambda:g} (docs/mergekit.md)"
    )
    body = yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    return "\n".join(head) + "\n" + body


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="larv-mergekit",
        description="Write a mergekit config (mergekit 0.1.4) whose per-layer `lambda` applies "
        "LARV's per-block scales s_ℓ, computed from θ_0 and the base merge of the fine-tuned "
        "models that mergekit's task_arithmetic or ties makes.",
    )
    p.add_argument("base", metavar="BASE", help="θ_0: a local Hugging Face causal-LM folder")
    p.add_argument("models", metavar="MODEL", nargs="+", help="the fine-tuned models' folders")
    p.add_argument("-o", "--output", required=True, help="the mergekit YAML to write")
    p.add_argument("--method", choices=METHODS, default="task_arithmetic")
    p.add_argument("--weight", type=float, nargs="+", default=None,
                   help="mergekit's per-model `weight`: one for all, or one per model (default 1)")  # fmt: skip
    p.add_argument("--density", type=float, default=None,
                   help="ties: the share of each tensor's task-vector entries kept")  # fmt: skip
    p.add_argument("--lambda", dest="base_lambda", type=float, default=1.0,
                   help="the base merge's own `lambda` (default 1): the list holds lambda·s_ℓ")  # fmt: skip
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a LARV config key (docs/options.md), e.g. --set gate=continuous")  # fmt: skip
    p.add_argument("--device", default=None, help="where the diagnostics run (default: cpu)")
    p.add_argument("--report", default=None,
                   help="also write LARV's per-block report (e, c, r, w, s) as JSON here")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``larv-mergekit``: write the config, print the per-block scales; 0 on success, 2 when the
    models or options are refused (the reason on stderr)."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args.settings)
        config, result, _ = export(args.base, args.models, args.method, args.weight,
                                   args.density, args.base_lambda, settings, args.device)  # fmt: skip
    except (LarvConfigError, LarvInputError, OSError) as e:
        print(f"larv-mergekit: error: {e}", file=sys.stderr)
        return 2
    write_text_atomic(args.output, render_yaml(config, result, args.base_lambda, settings))
    if args.report:
        write_json_atomic(args.report, result.to_dict())
    print(f"{'block':<24} {'e':>9} {'c':>9} {'w':>9} {'s':>7}")
    for rec in result.layers:
        print(f"{rec.prefix:<24} {rec.e:9.4g} {rec.c:9.4g} {rec.w:9.4g} {rec.s:7.4g}")
    for msg in result.warnings:
        print(f"warning: {msg}", file=sys.stderr)
    print(f"wrote {args.output}; run: mergekit-yaml {args.output} OUTPUT_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
