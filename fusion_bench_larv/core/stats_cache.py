"""θ_0's per-matrix statistics (‖θ_0‖_F², r_eff(θ_0), the small-side Gram of a rectangular
θ_0) depend only on the pretrained weights and the spectrum settings: computed once per run and,
opt-in (``stats_cache_dir``), kept on disk keyed by a hash of θ_0's content and those settings, so
that a sweep over mergers and gates pays for them once.

A cache file holds plain tensors, strings and numbers only (``torch.save``), read back with
``weights_only=True``; it is written atomically (:func:`~fusion_bench_larv.core.io.atomic_path`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .diagnostics import MatrixStats
from .io import atomic_path

log = logging.getLogger(__name__)

STATS_VERSION = 1


def stats_settings(settings) -> dict:
    """The settings that change θ_0's statistics (all of them kept, even where one has no effect
    for a spectrum kind, so that a key never aliases two configurations)."""
    return {
        "version": STATS_VERSION,
        "spectrum": str(settings.spectrum),
        "rank": int(settings.rank),
        "oversample": int(settings.oversample),
        "seed": int(settings.seed),
        "spectrum_tail": str(settings.spectrum_tail),
        "eps": float(settings.eps),
    }


@dataclass
class Theta0Stats:
    """Per-matrix statistics of θ_0, by parameter name."""

    settings_key: dict
    fro2: dict[str, float] = field(default_factory=dict)
    r_eff: dict[str, float] = field(default_factory=dict)
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # rectangular matrices only
    key: str | None = None  # content hash, when known

    @classmethod
    def empty(cls, settings) -> Theta0Stats:
        return cls(stats_settings(settings))

    def __contains__(self, name: str) -> bool:
        return name in self.r_eff

    def __len__(self) -> int:
        return len(self.r_eff)

    def check(self, settings) -> None:
        if self.settings_key != stats_settings(settings):
            raise ValueError(
                f"θ_0 statistics were computed with {self.settings_key}, "
                f"not with the current settings {stats_settings(settings)}"
            )

    def stacked(self, names: list[str], device) -> MatrixStats:
        """The statistics of ``names`` (all known, one shape) as one stack on ``device``."""
        fro2 = torch.tensor([self.fro2[k] for k in names], dtype=torch.float64, device=device)
        r_eff = torch.tensor([self.r_eff[k] for k in names], dtype=torch.float64, device=device)
        gram = None  # square matrices keep no Gram
        if names[0] in self.gram:
            gram = torch.stack([self.gram[k].to(device) for k in names])
        return MatrixStats(fro2, r_eff, gram)

    def store(self, names: list[str], stats: MatrixStats, grams: bool = True) -> None:
        """Keep the statistics of a stack under its matrices' ``names``; with ``grams``, the small
        Grams of a rectangular stack too (the bulk of the memory)."""
        for k, fro2, r_eff in zip(names, stats.fro2.tolist(), stats.r_eff.tolist(), strict=True):
            self.fro2[k], self.r_eff[k] = fro2, r_eff
        if grams and stats.gram is not None:
            self.gram.update(zip(names, stats.gram, strict=True))

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.gram.values())


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def content_key(theta0: Mapping[str, torch.Tensor], names: Iterable[str], settings) -> str:
    """A hash (BLAKE2b, 128 bit) of the named tensors' names, dtypes, shapes and bytes, and of the
    settings that the statistics depend on."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(sorted(stats_settings(settings).items())).encode())
    for name in sorted(names):
        t = theta0[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike, key: str) -> str:
    return os.path.join(os.fspath(os.path.expanduser(cache_dir)), f"larv-theta0-{key}.pt")


def load_stats(cache_dir: str | os.PathLike, key: str, settings) -> Theta0Stats | None:
    """The cached statistics for ``key``, or None (missing, unreadable or from other settings)."""
    path = cache_path(cache_dir, key)
    if not os.path.exists(path):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        names = list(obj["names"])
        fro2, r_eff = obj["fro2"].tolist(), obj["r_eff"].tolist()
        stats = Theta0Stats(
            dict(obj["settings"]),
            dict(zip(names, fro2, strict=True)),
            dict(zip(names, r_eff, strict=True)),
            dict(obj["gram"]),
            key=key,
        )
    except Exception as exc:  # a damaged file is a miss, never an error
        log.warning("LARV: ignoring unreadable θ_0 stats cache %s (%s)", path, exc)
        return None
    if stats.settings_key != stats_settings(settings) or obj.get("key") != key:
        return None
    return stats


def save_stats(cache_dir: str | os.PathLike, stats: Theta0Stats) -> str:
    if stats.key is None:
        raise ValueError("θ_0 statistics without a content key cannot be cached")
    path = cache_path(cache_dir, stats.key)
    names = list(stats.r_eff)
    obj = {
        "key": stats.key,
        "settings": stats.settings_key,
        "names": names,
        "fro2": torch.tensor([stats.fro2[n] for n in names], dtype=torch.float64),
        "r_eff": torch.tensor([stats.r_eff[n] for n in names], dtype=torch.float64),
        "gram": {n: g.detach().to("cpu").contiguous() for n, g in stats.gram.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path
