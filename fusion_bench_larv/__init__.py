"""fusion-bench-larv: LARV, a data-free layer-wise adaptive rescaling veneer for any task-vector
model merger, as a FusionBench plugin.

Every public name is imported on first use (PEP 562), so that the Hydra search-path plugin, which
imports :mod:`fusion_bench_larv.config_paths` on every Hydra run, loads neither torch nor
FusionBench."""

from importlib import import_module

__version__ = "0.1.0"

_HOME = {
    "LARVAlgorithm": "algorithm",
    "LarvAttributeError": "settings",
    "LarvConfigError": "settings",
    "LarvInputError": "validation",
    "LarvLayerError": "validation",
    "LarvResult": "veneer",
    "LarvSettings": "settings",
    "LarvWarning": "validation",
    "LiNeSAlgorithm": "lines_algorithm",
    "LayerGroupingError": "layers",
    "apply_scales": "veneer",
    "commutator_conflict": "diagnostics",
    "composite_score": "gates",
    "compute_larv_scales": "veneer",
    "continuous_gate": "gates",
    "depth_schedule": "gates",
    "effective_rank": "diagnostics",
    "group_layers": "layers",
    "normalize_scores": "gates",
    "rank_contrast": "diagnostics",
    "singular_values": "diagnostics",
    "tiered_gate": "gates",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
