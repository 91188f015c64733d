"""What LARV reads of a model the pool hands out: an ``nn.Module``'s state dict, or FusionBench's
``LazyStateDict`` (a ``CausalLMPool`` with ``enable_lazy_loading: true``) seen as that state dict.

A lazy state dict lists the names its checkpoint files store; a merger that starts from one
(Task Arithmetic, TIES, simple averaging) returns its meta module filled in, whose
``state_dict()`` also lists the names a tied weight has besides the stored one (Qwen2.5-1.5B's
``lm_head.weight`` is ``model.embed_tokens.weight``). :class:`LazyModelState` gives the lazy
model under the module's names, each read from disk when asked for, so that θ_0 and the merged
model have the same names whether the pool loads lazily or not."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from copy import deepcopy
from typing import Any

import torch
from fusion_bench.utils.lazy_state_dict import LazyStateDict
from torch import nn

from ..errors import LarvInputError

__all__ = [
    "LazyModelState",
    "ServedLazyStateDict",
    "architecture_of",
    "is_lazy",
    "lazy_meta_module",
    "model_state",
    "repair_lazy_merge",
    "served",
    "state_copy",
    "store_into",
]


def is_lazy(model: Any) -> bool:
    """Whether ``model`` is FusionBench's lazy state dict rather than a built module."""
    return isinstance(model, LazyStateDict)


def tied_meta_module(lazy: LazyStateDict) -> nn.Module | None:
    """A copy of the lazy model's meta module (weights on the meta device, buffers built) with
    its weights tied as its config says (transformers' ``tie_weights``): FusionBench builds it
    under ``init_empty_weights``, which leaves a tied ``lm_head`` a separate parameter."""
    if lazy.meta_module is None:
        return None
    meta = deepcopy(lazy.meta_module)
    if callable(getattr(meta, "tie_weights", None)):
        meta.tie_weights()
    return meta


def stored_names(lazy: LazyStateDict) -> dict[str, str]:
    """Module name → the name its tensor is stored under, in the module's ``state_dict()``
    order: the name itself when the checkpoint has it, else the first of its tied names that it
    has (tied parameters are one object in :func:`tied_meta_module`). Without a meta module, the
    checkpoint's own names. A name with no stored tensor at all is a :class:`LarvInputError`."""
    meta = tied_meta_module(lazy)
    present = list(lazy.keys())
    if meta is None:
        return {k: k for k in present}
    present_set = set(present)
    entries = list(meta.state_dict(keep_vars=True).items())
    tied: dict[int, list[str]] = {}
    for name, tensor in entries:
        tied.setdefault(id(tensor), []).append(name)
    out = {}
    for name, tensor in entries:
        found = [n for n in (name, *tied[id(tensor)]) if n in present_set]
        if not found:
            raise LarvInputError(
                f"the lazily loaded checkpoint {lazy.checkpoint!r} stores no tensor for "
                f"`{name}` of its model ({type(meta).__name__}), nor for a weight tied to it: "
                "LARV needs every parameter of θ_0 and of the merged model"
            )
        out[name] = found[0]
    return out


class LazyModelState(Mapping[str, torch.Tensor]):
    """A :class:`LazyStateDict` as its model's ``state_dict()``: the module's names in its
    order, a tied name read under the name stored (:func:`stored_names`). Every access reads the
    tensor from disk (or the lazy dict's cache); nothing is kept here."""

    def __init__(self, lazy: LazyStateDict):
        self.lazy = lazy
        self.stored = stored_names(lazy)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.lazy[self.stored[name]]

    def __contains__(self, name: object) -> bool:
        return name in self.stored  # Mapping's default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)

    def copy(self) -> dict[str, torch.Tensor]:
        """Every tensor read once into a plain dict; tied names share one tensor, as in a built
        model's state dict."""
        read: dict[str, torch.Tensor] = {}
        return {name: read.setdefault(src, self.lazy[src]) for name, src in self.stored.items()}


def model_state(model: nn.Module | LazyStateDict) -> Mapping[str, torch.Tensor]:
    """The model's state dict: a module's own (its tensors, not copies), or the lazy view."""
    return LazyModelState(model) if is_lazy(model) else model.state_dict()


def state_copy(model: nn.Module | LazyStateDict) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict that nothing the merger does can change: a module's
    tensors cloned; a lazy model's read from disk (fresh tensors already), tied names sharing
    one tensor."""
    if is_lazy(model):
        return LazyModelState(model).copy()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def store_into(lazy: LazyStateDict, state: Mapping[str, torch.Tensor]) -> None:
    """Write ``state`` (module names, as :func:`state_copy` gives) into the lazy dict, under
    the names it stores; a merger that loads it then reads these tensors, not the checkpoint's.
    (A lazy dict's ``state_dict()`` is a copy of it, so writing into that would be lost.)"""
    for name, src in stored_names(lazy).items():
        if name == src:
            lazy[src] = state[name]


@torch.no_grad()
def repair_lazy_merge(merged: nn.Module, meta: nn.Module) -> None:
    """In place: the merger's output for a lazy pool made whole. FusionBench builds it as the
    pretrained meta module emptied (``to_empty``) and loaded with the merged state dict, so what
    the checkpoint does not store stays uninitialised memory:

    - a weight tied to another (``lm_head`` under ``tie_word_embeddings``, Qwen2.5-1.5B's case)
      is tied again as the model's config says (``tie_weights``), i.e. it is the merged
      embedding;
    - the non-persistent buffers (the rotary embedding's ``inv_freq``) are copied from ``meta``
      (:func:`tied_meta_module`), which built them.

    A checkpoint saved from the model rebuilds both on loading, but LARV rescales the head (its
    NaN/Inf, if the memory held any, would stop the run) and the returned model is evaluated."""
    if callable(getattr(merged, "tie_weights", None)):
        merged.tie_weights()
    persistent = set(merged.state_dict())
    built = dict(meta.named_buffers())
    for name, buf in merged.named_buffers():
        src = built.get(name)
        if name not in persistent and src is not None and src.device.type != "meta":
            buf.copy_(src)


def lazy_meta_module(model: Any) -> nn.Module | None:
    """For a lazy model, its :func:`tied_meta_module` (what :func:`repair_lazy_merge` repairs
    the merge from); None for a built module."""
    return tied_meta_module(model) if is_lazy(model) else None


class ServedLazyStateDict(LazyStateDict):
    """FusionBench's lazy state dict whose ``state_dict`` also takes ``prefix``, as
    ``nn.Module.state_dict`` does. FusionBench 0.2.33's simple averaging (and so
    ``linear/simple_average_for_causallm``) reads every model it loads through
    ``get_target_state_dict``, i.e. ``model.state_dict(prefix="", keep_vars=False)``, which its
    own ``LazyStateDict`` refuses (TypeError), so it fails on any lazy pool. The pool view
    serves lazy models as this class (:func:`served`); nothing else changes."""

    def state_dict(self, *, prefix: str = "", keep_vars: bool = False) -> Any:
        copy = super().state_dict(keep_vars=keep_vars)
        return {prefix + k: v for k, v in copy.items()} if prefix else copy


def served(model: Any) -> Any:
    """``model`` as the pool view hands it to the merger: a lazy state dict becomes a
    :class:`ServedLazyStateDict` (the same object, its class changed); anything else as it is."""
    if type(model) is LazyStateDict:
        model.__class__ = ServedLazyStateDict
    return model


def architecture_of(model: nn.Module | LazyStateDict) -> str:
    """The model's class name as messages give it (a lazy model's: its meta module's)."""
    if is_lazy(model) and model.meta_module is not None:
        return type(model.meta_module).__name__
    return type(model).__name__
