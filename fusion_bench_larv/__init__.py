"""fusion-bench-larv: LARV, a data-free layer-wise adaptive rescaling veneer for any task-vector
model merger, as a FusionBench plugin.

The package is five rooms: :mod:`.core` (LARV's maths on plain state dicts, no FusionBench),
:mod:`.adapter` (the FusionBench wrapper skeleton and LARV on it), :mod:`.methods` (LiNeS and LOT
Merging), :mod:`.evaluation` (the recording task pool, per-sample files, intervals,
``larv-compare``) and :mod:`.export` (``larv-mergekit``: LARV's scales as a mergekit config);
:mod:`.errors` holds every error class.

Every public name is imported on first use (PEP 562), so that the Hydra search-path plugin, which
imports :mod:`fusion_bench_larv.config_paths` on every Hydra run, loads neither torch nor
FusionBench."""

from importlib import import_module

__version__ = "0.1.0"

_HOME = {
    "CompareError": "errors",
    "Gate": "core.registry",
    "GateOutput": "core.registry",
    "LARVAlgorithm": "adapter.algorithm",
    "LOTMergingAlgorithm": "methods.lot_algorithm",
    "LarvAttributeError": "errors",
    "LarvConfigError": "errors",
    "LarvInputError": "errors",
    "LarvLayerError": "errors",
    "LarvResult": "core.veneer",
    "LarvSettings": "core.settings",
    "LarvWarning": "errors",
    "LiNeSAlgorithm": "methods.lines_algorithm",
    "LayerGroupingError": "errors",
    "RecordingCLIPImageClassificationTaskPool": "evaluation.clip_taskpool",
    "RecordingCLIPVisionModelTaskPool": "evaluation.clip_taskpool",
    "Schedule": "core.registry",
    "SignedDepthRamp": "methods.lines_algorithm",
    "UpdateRescaler": "adapter.wrapper",
    "apply_scales": "core.veneer",
    "commutator_conflict": "core.diagnostics",
    "composite_score": "core.gates",
    "compute_larv_scales": "core.veneer",
    "continuous_gate": "core.gates",
    "depth_schedule": "core.registry",
    "effective_rank": "core.diagnostics",
    "group_layers": "core.layers",
    "normalize_scores": "core.gates",
    "rank_contrast": "core.diagnostics",
    "register_gate": "core.registry",
    "register_schedule": "core.registry",
    "singular_values": "core.diagnostics",
    "tiered_gate": "core.gates",
}

# modules of the earlier flat layout that configs name (docs/architecture.md): Hydra resolves an
# old `_target_` such as `fusion_bench_larv.lines_algorithm.LiNeSAlgorithm` through them
_MOVED = {
    "algorithm": "adapter.algorithm",
    "clip_taskpool": "evaluation.clip_taskpool",
    "compare": "evaluation.compare",
    "lines_algorithm": "methods.lines_algorithm",
    "lot_algorithm": "methods.lot_algorithm",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(import_module(f".{_HOME[name]}", __name__), name)
    elif name in _MOVED:
        value = import_module(f".{_MOVED[name]}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
