"""How the core reads a state dict: tensors held in memory (a plain mapping name → tensor), or a
:class:`StreamedState`, which reads each tensor when asked for it and keeps none, so that LARV
can work through θ_0 one stack (diagnostics) or one tensor (rescaling) at a time without a copy
of the model (docs/causal-lm.md, "Memory"). No FusionBench imports: the adapter builds the
reader (``adapter/model_state.py``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..errors import LarvInputError

__all__ = ["StreamedState", "TensorSpec", "matrix_shape", "spec_of"]


@dataclass(frozen=True)
class TensorSpec:
    """What the core needs to know of a tensor without its values: shape, dtype, device (the
    same attributes and methods a tensor answers them with)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(t.shape, t.dtype, t.device)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def matches(self, t: torch.Tensor) -> bool:
        return tuple(t.shape) == tuple(self.shape) and t.dtype == self.dtype


class StreamedState(Mapping[str, torch.Tensor]):
    """A state dict read on demand: ``state[name]`` calls ``read(name)`` (from disk, say) and
    keeps nothing, so holding it costs no tensor memory. ``specs`` (name → :class:`TensorSpec`,
    in state-dict order) answers names, shapes and dtypes without reading (:func:`spec_of`).

    ``checked``: its values were checked for NaN/Inf when it was opened (``check_finite`` then
    does not read it again). ``source``: what it reads, for messages. A read whose shape or dtype
    is not its spec's is a :class:`LarvInputError` (what it reads changed since it was opened)."""

    def __init__(
        self,
        read: Callable[[str], torch.Tensor],
        specs: Mapping[str, TensorSpec],
        source: str,
        checked: bool = False,
    ):
        self._read, self.specs, self.source, self.checked = read, dict(specs), source, checked

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        t = self._read(name)
        if not spec.matches(t):
            raise LarvInputError(
                f"{self.source}: tensor {name!r} now reads as {tuple(t.shape)} {t.dtype}, not the "
                f"{tuple(spec.shape)} {spec.dtype} it read as when LARV opened it: its files "
                "changed during the run"
            )
        return t

    def __contains__(self, name: object) -> bool:
        return name in self.specs  # Mapping's default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def nbytes(self) -> int:
        """The bytes its tensors take once read (what a copy of it would hold)."""
        return sum(s.numel() * s.dtype.itemsize for s in self.specs.values())


def spec_of(state: Mapping[str, torch.Tensor], name: str) -> TensorSpec | torch.Tensor:
    """The shape, dtype and device of ``state[name]`` without reading a streamed state (its
    :class:`TensorSpec`); for a state in memory, the tensor itself (which answers the same)."""
    if isinstance(state, StreamedState):
        return state.specs[name]
    return state[name]


def matrix_shape(t: TensorSpec | torch.Tensor) -> tuple[int, int]:
    """The shape of the diagnostics' matrix view (``diagnostics.as_matrix``): a conv kernel
    (out, in, kh, kw) as (out, in·kh·kw)."""
    if t.ndim < 2:
        raise ValueError(f"diagnostics need a tensor with >= 2 dims, got shape {tuple(t.shape)}")
    return int(t.shape[0]), math.prod(t.shape[1:])
