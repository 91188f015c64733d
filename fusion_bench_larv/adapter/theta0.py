"""LARV's θ_0 for one run (docs/causal-lm.md, "Memory"). Every merger overwrites the pretrained
model it loads, so LARV needs θ_0 of its own, twice after the merge: the diagnostics read it
stack by stack, then the rescaling tensor by tensor. Where θ_0 can be read back from its
checkpoint files LARV does that (:class:`~fusion_bench_larv.core.state.StreamedState`) and holds
no copy; elsewhere it keeps one copy in memory, and the log says which and why:

- a lazily loaded pool (``CausalLMPool`` with ``enable_lazy_loading: true``) whose lazy state
  dict reads safetensors files and keeps nothing: streamed;
- an eagerly loaded ``CausalLMPool`` whose ``_pretrained_`` loads lazily to exactly the same
  tensors (checked tensor by tensor when the run opens, before the merge): streamed;
- anything else (a model instance in the pool, which the merger may modify; other pools, which
  have no lazy reader; a lazy dict that holds its tensors anyway): a copy.

What is streamed is read through LARV's own lazy state dict, which no merger is handed (each
``load_model`` builds the merger a new one) and which caches nothing, so nothing the merger does
reaches it; the checkpoint files it reads are stamped (inode, size, modification time) when the
run opens, and a read after any of them changed is a :class:`LarvInputError`."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch
from fusion_bench import BaseModelPool
from fusion_bench.modelpool import CausalLMPool
from fusion_bench.utils.lazy_state_dict import LazyStateDict
from torch import nn

from ..core.inputs import check_finite
from ..core.state import StreamedState, TensorSpec
from ..errors import LarvInputError
from .model_state import LazyModelState, is_lazy, state_copy
from .pool_view import in_memory_model

__all__ = ["open_theta0"]

LABEL = "model `_pretrained_`"


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def streamed(lazy: LazyStateDict, against: Mapping[str, torch.Tensor] | None = None):
    """θ_0 read from the lazy dict's checkpoint files on every access, as a checked
    :class:`StreamedState`, or the reason (a string) it cannot be.

    Reads every tensor once here: checks it for NaN/Inf, records its spec and, with
    ``against`` (the pool's eager θ_0), requires it equal (same dtype and device,
    ``torch.equal``); any difference is a reason to keep the eager copy instead."""
    if getattr(lazy, "_state_dict_cache", None) is not None:
        return ("its lazy state dict holds its tensors in memory (a `pytorch_model.bin` is read "
                "whole; `cache_state_dict: true` keeps what is read)")  # fmt: skip
    files = list(getattr(lazy, "_checkpoint_files", None) or [])
    if not files or not all(f.endswith(".safetensors") and os.path.isfile(f) for f in files):
        return f"its checkpoint files are not safetensors files LARV can stamp ({files})"
    own = copy.deepcopy(lazy)  # LARV's own reader: nothing the merger is handed
    view = LazyModelState(own)
    stamps = {f: _stamp(f) for f in files}
    source = f"θ_0 ({own.checkpoint})"

    def read(name: str) -> torch.Tensor:
        for f, stamp in stamps.items():
            if _stamp(f) != stamp:
                raise LarvInputError(
                    f"{source}: its checkpoint file {f} changed during the run; LARV reads θ_0 "
                    "from it when rescaling and cannot use what it holds now"
                )
        return view[name]

    specs = {}
    for name in view:
        t = read(name)
        check_finite({name: t}, LABEL)
        if against is not None:
            ref = against.get(name)
            same = ref is not None and ref.dtype == t.dtype and ref.device == t.device
            if not (same and torch.equal(ref, t)):
                return (f"its checkpoint read lazily differs from the pool's eager load (tensor "
                        f"`{name}`)")  # fmt: skip
        specs[name] = TensorSpec.of(t)
        del t
    if against is not None and set(against) != set(specs):
        return "its checkpoint read lazily lists other tensors than the pool's eager load"
    return StreamedState(read, specs, source, checked=True)


def _lazy_twin(pool: BaseModelPool) -> LazyStateDict | str:
    """An eager ``CausalLMPool``'s θ_0 loaded as the same pool with lazy loading on would load
    it, or the reason it cannot be."""
    twin = copy.copy(pool)
    twin.enable_lazy_loading = True
    try:
        lazy = twin.load_pretrained_model()
    except Exception as err:  # its model_kwargs may not suit a lazy state dict
        return f"the pool cannot load it lazily ({type(err).__name__}: {err})"
    return lazy if is_lazy(lazy) else "the pool does not load it lazily"


def _nbytes(state: Mapping[str, torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in state.values():
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def open_theta0(
    pool: BaseModelPool, pretrained: nn.Module | LazyStateDict, checked: bool, stream: bool = True
) -> tuple[Mapping[str, torch.Tensor], str]:
    """(θ_0 under the model's names, how it is held: a line for the log after "LARV: "); see the module
    docstring. θ_0 comes back checked for NaN/Inf (``checked``: it was already). ``stream``:
    False keeps a copy whatever the pool (the path every pool took before streaming; tests
    compare the two)."""
    reason = "streaming is off"
    if stream:
        if in_memory_model(pool, "_pretrained_") is not None:
            reason = "the pool holds θ_0 as a model instance, which the merger may modify"
        elif is_lazy(pretrained):
            reason = streamed(pretrained)
        elif isinstance(pool, CausalLMPool):
            twin = _lazy_twin(pool)
            reason = twin if isinstance(twin, str) else streamed(twin, pretrained.state_dict())
        else:
            reason = (f"the pool ({type(pool).__name__}) loads θ_0 eagerly and has no lazy "
                      "reader for it")  # fmt: skip
    if isinstance(reason, StreamedState):
        return reason, (
            f"reads {reason.source} from its checkpoint files when needed, a stack of "
            f"matrices or a tensor at a time, and holds no copy of it "
            f"({reason.nbytes() / 2**30:.2f} GiB)"
        )
    theta0 = state_copy(pretrained)
    if not checked:
        check_finite(theta0, LABEL)
    how = f"keeps a copy of θ_0 in memory ({_nbytes(theta0) / 2**30:.2f} GiB): {reason}"
    if is_lazy(pretrained) or isinstance(pool, CausalLMPool):
        how += " (see docs/causal-lm.md, 'Memory')"
    return theta0, how
