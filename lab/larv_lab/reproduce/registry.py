"""The one registry of mergers and reference methods, read from the config tree (config is data).

- ``larv/mergers.yaml`` (the lab's config tree): the mergers' display metadata (label, in the paper, default,
  needs data) and the reference methods (pretrained, fine-tuned, Fisher, ...).
- ``method/larv_<merger>.yaml`` (the plugin's config tree): everything a merger *runs*. Its LARV cells run that config;
  its base cell runs that config's ``base_method`` node, i.e. FusionBench's own method config
  named in the defaults list (``/method/<option>@base_method``) with the ``base_method:`` block
  merged over it. The block is copied unresolved, so an interpolation such as Iso-C's
  ``${oc.select:larv_suite.iso_c_scaling,1.30}`` resolves in the suite's config, exactly as it
  does inside the LARV config.

No hyperparameter is written in Python: adding a merger is one method config and one line in
``mergers.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fusion_bench_larv.config_paths import fusion_bench_config_dir, larv_config_dir

from .. import config_dir

REGISTRY_FILE = Path("larv") / "mergers.yaml"


def lab_config_dir() -> Path:
    """The lab's config tree (:func:`larv_lab.config_dir`)."""
    return config_dir()


def config_roots() -> list[Path]:
    """Where configs are looked up, first match wins: an edited copy (see
    :class:`use_config_root`), the lab's tree, the plugin's tree, then FusionBench's own."""
    roots = [custom_config_root(), lab_config_dir(), larv_config_dir(), fusion_bench_config_dir()]
    return [r for r in roots if r is not None]


def find_config(relative: str | Path, roots: Sequence[Path] | None = None) -> Path:
    """The first ``root / relative`` that is a file, over ``roots`` (default :func:`config_roots`)."""
    roots = config_roots() if roots is None else roots
    for root in roots:
        if (Path(root) / relative).is_file():
            return Path(root) / relative
    raise FileNotFoundError(f"{relative} not found in {[str(r) for r in roots]}")


def find_primary(name: str, extra: Sequence[str | Path] = ()) -> Path:
    """The YAML file of a primary config (``larv_clip-vit-...``, ``fabric_model_fusion``, ...)."""
    return find_config(f"{name}.yaml", [*map(Path, extra), *config_roots()])


@dataclass(frozen=True)
class Merger:
    """A base merger: ``larv_config`` for its LARV cells, ``base_config`` (a FusionBench method
    config) with ``base_values`` merged over it for its base cell."""

    name: str
    label: str
    larv_config: str
    base_config: str
    base_values: Mapping[str, Any] = field(default_factory=dict)
    paper: bool = False
    default: bool = True
    needs_data: str | None = None
    stands_in_for: str | None = None  # a lab config computing that merger (mergers.yaml)

    @property
    def data_free(self) -> bool:
        return self.needs_data is None


@dataclass(frozen=True)
class Reference:
    """A reference row: a FusionBench method config (``method``, ``values`` merged over it)."""

    name: str
    label: str
    method: str
    values: Mapping[str, Any] = field(default_factory=dict)
    own_task: bool = False  # one model per task, each read on its own task
    needs_data: str | None = None


@dataclass(frozen=True)
class Registry:
    source: Path  # the mergers.yaml it was read from
    mergers: Mapping[str, Merger]
    references: Mapping[str, Reference]

    def label(self, name: str) -> str:
        if name in self.mergers:
            return self.mergers[name].label
        if name in self.references:
            return self.references[name].label
        return name

    def default_mergers(self) -> list[str]:
        return [m for m, x in self.mergers.items() if x.default]

    def paper_mergers(self) -> list[str]:
        return [m for m, x in self.mergers.items() if x.paper]

    def stand_ins(self) -> dict[str, str]:
        """Lab config -> the merger it computes (``stands_in_for``)."""
        return {m: x.stands_in_for for m, x in self.mergers.items() if x.stands_in_for}


def _base_of(path: Path, roots: Sequence[Path]) -> tuple[str, dict[str, Any]]:
    """FusionBench's method config named in a ``larv_*`` config's defaults list and the
    ``base_method:`` block merged over it (unresolved). A ``larv_*`` config may instead build on
    another one (``/method/larv_<other>@_here_``): its base, with this block merged over it."""
    doc = yaml.safe_load(path.read_text()) or {}
    base, values = None, {}
    for entry in doc.get("defaults", []):
        if not isinstance(entry, str):
            continue
        name = entry.rsplit("@", 1)[0].strip().removeprefix("/").removeprefix("method/")
        if entry.endswith("@base_method"):
            base = name
        elif entry.endswith("@_here_") and name.startswith("larv_"):
            base, values = _base_of(find_config(Path("method") / f"{name}.yaml", roots), roots)
    if base is None:
        raise ValueError(f"{path}: no `/method/<option>@base_method` entry in its defaults list")
    own = doc.get("base_method") or {}
    if not isinstance(own, Mapping):
        raise ValueError(f"{path}: `base_method` must be a mapping, got {own!r}")
    return base, {**values, **own}


@cache
def _load(roots: tuple[Path, ...]) -> Registry:
    registry_file = find_config(REGISTRY_FILE, roots)
    doc = yaml.safe_load(registry_file.read_text()) or {}
    mergers = {}
    for name, meta in (doc.get("mergers") or {}).items():
        larv_config = f"larv_{name}"
        try:
            path = find_config(Path("method") / f"{larv_config}.yaml", roots)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"merger {name!r} ({registry_file}): {e}") from None
        base_config, base_values = _base_of(path, roots)
        mergers[name] = Merger(
            name=name,
            label=str(meta.get("label", name)),
            larv_config=larv_config,
            base_config=base_config,
            base_values=base_values,
            paper=bool(meta.get("paper", False)),
            default=bool(meta.get("default", True)),
            needs_data=meta.get("needs_data"),
            stands_in_for=meta.get("stands_in_for"),
        )
    references = {
        name: Reference(
            name=name,
            label=str(meta.get("label", name)),
            method=str(meta["method"]),
            values=dict(meta.get("values") or {}),
            own_task=bool(meta.get("own_task", False)),
            needs_data=meta.get("needs_data"),
        )
        for name, meta in (doc.get("references") or {}).items()
    }
    clash = set(mergers) & set(references)
    if clash:
        raise ValueError(f"{registry_file}: names both a merger and a reference: {clash}")
    return Registry(registry_file, mergers, references)


_override: list[Path] = []


def registry() -> Registry:
    """The registry of the active config tree (see :func:`use_config_root`)."""
    return _load(tuple(r.resolve() for r in config_roots()))


def display_label(name: str) -> str:
    """How tables and figures show a merger or reference method: its ``label`` in the active
    registry (``mergers.yaml``); a name the registry does not know is shown as it is."""
    return registry().label(name)


class use_config_root:
    """Context manager: read the registry (and let the generated sweeps search) another copy of
    this plugin's config tree, e.g. an edited one in a temporary folder, or a folder of stand-in
    model / task pool configs under the names a suite's primary config picks (the tests' tiny
    stand-in of FusionBench's corrupted-data pool). Its ``method``, ``larv``, ``modelpool`` and
    ``taskpool`` folders come first on the sweeps' search path."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def __enter__(self) -> Registry:
        _override.append(self.root)
        return registry()

    def __exit__(self, *exc) -> None:
        _override.remove(self.root)
        _load.cache_clear()


def custom_config_root() -> Path | None:
    """The config tree set by :class:`use_config_root`, if any (generated sweeps put it first on
    their search path)."""
    return _override[-1] if _override else None


def base_method_config(merger: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Merger ``merger``'s base method config exactly as ``method=larv_<merger>`` composes it
    (FusionBench's own config with the ``base_method:`` block over it), resolved outside any
    suite (so Iso-C takes its ViT-B/32 default), as a plain dict for ``hydra.utils.instantiate``.
    ``overrides``: extra Hydra overrides, e.g. ``method.base_method.iter_num=20``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    larv_config = registry().mergers[merger].larv_config
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(fusion_bench_config_dir()), version_base=None):
            cfg = compose("fabric_model_fusion", overrides=[f"method={larv_config}", *overrides])
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.method.base_method, resolve=True)
