"""The rows a collation shows, tables and figures alike: suites, mergers, references, max†."""

from __future__ import annotations

from collections.abc import Sequence

from .experiments import BENCH_VARIANTS, CONTINUOUS, TIERED, Cell, Suite, schedule
from .registry import registry

MAX = "larv-max"  # pseudo variant: the better gate per cell (oracle, as in the paper)
#: the benchmark's second reference: LARV's rows (:data:`VS_LINEAR`) are also compared with the
#: same merger's plain linear depth ramp (``schedule: linear``), on the same test examples
LINEAR = schedule("linear").slug
VS_LINEAR = (
    *(v.slug for v in BENCH_VARIANTS if v.larv is not None and v.larv.get("gate") != "schedule"),
    MAX,
)
#: another merger's cell read against a merger's rows (tables and figures): (merger, its cell,
#: label). Layer-wise AdaMerging learns one λ per task vector and block over Task Arithmetic's
#: task vectors (on unlabelled test inputs): the per-task ceiling's reading, without labels
OVER = {"ta": (("testbed_adamerging", "base"), "layer-wise AdaMerging (unlabelled test inputs)")}


def mergers(cells: Sequence[Cell]) -> list[str]:
    """The cells' mergers (not the references), in order of appearance."""
    out: list[str] = []
    for c in cells:
        if not c.is_reference and c.merger not in out:
            out.append(c.merger)
    return out


def refs(cells: Sequence[Cell]) -> list[str]:
    """The cells' reference rows, in the registry's order."""
    return [r for r in registry().references if any(c.merger == r for c in cells)]


def suites(cells: Sequence[Cell]) -> list[Suite]:
    """The cells' suites, in order of appearance."""
    seen: dict[str, Suite] = {}
    for c in cells:
        seen.setdefault(c.suite.key, c.suite)
    return list(seen.values())


def variants(cells: Sequence[Cell], order: Sequence[str]) -> list[str]:
    """The cells' variants in ``order``, with :data:`MAX` where both gates ran."""
    have = {c.variant.slug for c in cells}
    if TIERED.slug in have and CONTINUOUS.slug in have:
        have.add(MAX)  # the pseudo row, where the order places it
    return [v for v in order if v in have]


def mergers_by_data(cells: Sequence[Cell]) -> tuple[list[str], list[str]]:
    """The cells' mergers: (data-free ones, those that read data themselves, such as LOT)."""
    found = mergers(cells)
    using = [m for m in found if not registry().mergers[m].data_free]
    return [m for m in found if m not in using], using


def refs_by_data(cells: Sequence[Cell]) -> tuple[list[str], list[str]]:
    """The cells' reference rows: (data-free ones, data-using ones such as AdaMerging)."""
    found = refs(cells)
    using = [r for r in found if registry().references[r].needs_data]
    return [r for r in found if r not in using], using


def uses_data(cells: Sequence[Cell]) -> dict[str, str]:
    """variant slug -> the data it uses, for the cells' data-using variants."""
    return {c.variant.slug: c.variant.uses_data for c in cells if c.variant.uses_data}


def has_linear(cells: Sequence[Cell]) -> bool:
    """The cells hold the linear ramp and at least one of LARV's rows compared with it."""
    have = {c.variant.slug for c in cells}
    return LINEAR in have and any(v in have for v in VS_LINEAR)
