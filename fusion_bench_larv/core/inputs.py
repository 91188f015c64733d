"""Checks of the inputs a run is given (the models, as state dicts): finiteness, matching keys
and shapes, usable scales, enough blocks. Each raises
:class:`~fusion_bench_larv.errors.LarvInputError` naming the model and the tensor; no
FusionBench imports."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..errors import LarvInputError, LarvLayerError, LayerGroupingError
from .layers import LayerGroups, group_layers
from .state import StreamedState, spec_of

# LARV needs at least this many transformer blocks: with one block the "layer-wise" rescaling is a
# single global scale (the tiered gate would shrink the whole update to levels[0]).
MIN_LAYERS = 2


def _tensor_problem(t: torch.Tensor) -> str | None:
    if not torch.is_floating_point(t) and not torch.is_complex(t):
        return None
    if t.numel() == 0 or t.device.type == "meta" or t.layout != torch.strided:
        return None
    # One reduction first (~25x cheaper than isfinite + all on a CPU): any NaN or Inf makes the
    # sum non-finite; a non-finite sum of finite values (overflow) falls through to the full check.
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return None
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(t.numel() - int(finite.sum()) - nan)
    return f"{nan} NaN and {inf} Inf of {t.numel()} values"


def check_finite(state: Mapping[str, torch.Tensor], model: str) -> None:
    """Raise :class:`LarvInputError` naming the first tensor (and the model) with NaN or Inf. A
    streamed state checked when it was opened (``StreamedState.checked``) is not read again."""
    if isinstance(state, StreamedState) and state.checked:
        return
    for name, t in state.items():
        problem = _tensor_problem(t)
        if problem is not None:
            raise LarvInputError(
                f"{model} has non-finite values in tensor {name!r} ({problem}); LARV refuses to "
                "merge it: a NaN/Inf weight makes every merged number meaningless. Check that "
                "checkpoint (a diverged fine-tune, a bad fp16 conversion)."
            )


def check_same_keys_and_shapes(
    theta0: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor]
) -> None:
    """θ_0 and the merged model must list the same parameters with the same shapes (read from
    their specs: a streamed state is not read)."""
    missing = [k for k in theta0 if k not in merged]
    extra = [k for k in merged if k not in theta0]
    if missing or extra:
        raise LarvInputError(
            "θ_0 (the pretrained model) and the merged model have different parameters: "
            f"missing in merged {missing[:5]}{' …' if len(missing) > 5 else ''}, "
            f"only in merged {extra[:5]}{' …' if len(extra) > 5 else ''}. The base method must "
            "return a model of the pretrained model's architecture."
        )
    for k in merged:
        shape, shape0 = tuple(spec_of(merged, k).shape), tuple(spec_of(theta0, k).shape)
        if shape != shape0:
            raise LarvInputError(
                f"shape of {k!r} differs: θ_0 {shape0} vs merged {shape}. The base method "
                "must return a model of the pretrained model's architecture."
            )


def layer_error(names: Sequence[str], layer_pattern: str | None, reason: str) -> LarvLayerError:
    """A :class:`LarvLayerError` naming the first parameter names seen and the option to set."""
    shown = list(names[:8])
    more = f" … ({len(names)} in all)" if len(names) > len(shown) else ""
    how = (
        "the auto-detected pattern"
        if layer_pattern is None
        else f"`layer_pattern` = {layer_pattern!r}"
    )
    return LarvLayerError(
        f"{reason} (with {how}). LARV needs at least {MIN_LAYERS} transformer blocks. First "
        f"parameter names seen: {shown}{more}. Set the `layer_pattern` option "
        "(method.layer_pattern=<regex> on the command line) to a regex whose group "
        "(?P<idx>\\d+) captures the block index, e.g. '^encoder\\.layers\\.(?P<idx>\\d+)\\.'."
    )


def check_scales(
    theta0: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    param_scale: Mapping[str, float],
) -> None:
    """Inputs of ``apply_scales``: every scaled name in both state dicts, same shapes, floating
    tensors, finite scales (all checked before any tensor is changed)."""
    for name, s in param_scale.items():
        if name not in merged or name not in theta0:
            side = "the merged model" if name not in merged else "θ_0"
            raise LarvInputError(f"a scale is given for {name!r}, which {side} does not have")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise LarvInputError(f"the scale of {name!r} is {s!r}; scales must be finite numbers")
        t, t0 = spec_of(merged, name), spec_of(theta0, name)
        if tuple(t.shape) != tuple(t0.shape):
            raise LarvInputError(
                f"shape of {name!r} differs: θ_0 {tuple(t0.shape)} vs merged {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise LarvInputError(
                f"{name!r} is a {t.dtype} tensor; only floating-point parameters can be rescaled"
            )


def grouped_layers(names: Sequence[str], layer_pattern: str | None) -> LayerGroups:
    """:func:`~fusion_bench_larv.core.layers.group_layers`, with a :class:`LarvLayerError` naming the
    first parameter names and the ``layer_pattern`` option when no (or too few) blocks are found.
    Needs only θ_0's parameter names, so it can run before any merging."""
    names = list(names)
    try:
        groups = group_layers(names, layer_pattern)
    except LayerGroupingError as err:
        raise layer_error(names, layer_pattern, str(err)) from err
    if groups.num_layers < MIN_LAYERS:
        raise layer_error(names, layer_pattern, f"only {groups.num_layers} block(s) found")
    return groups
