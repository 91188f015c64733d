"""The experiments as data: suites (model pool + task pool), variants (LARV settings) and
experiments (suites × mergers × variants), expanded into FusionBench runs ("cells"). Every cell
has a deterministic folder ``<out>/runs/<suite>/<merger>/<variant>/``; a cell is done when its
``program_report.json`` exists and parses. Whatever launches a cell (a Hydra multirun of the
``fusion_bench`` CLI or the in-process launcher) composes the same config for it.

Mergers and reference methods come from the registry (:mod:`.registry`: ``config/larv/
mergers.yaml`` and the ``config/method/larv_*.yaml`` files) at call time: a merger registered
there joins the default merger list automatically; one marked ``default: false`` (LOT: it needs
data) only joins when named (``--merger lot``). No hyperparameter is written here.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .registry import find_primary, registry

#: merger selections resolved from the registry when an experiment is expanded
DEFAULT = "default"  # every merger marked `default: true`
PAPER = "paper"  # the paper's five base mergers (`paper: true`)
#: the four mergers of the paper's ablations (Tables 3, 5, 6, Figure 4)
ABLATION_MERGERS = ("ties", "iso_c", "iso_cts", "tsvm")

#: backbone -> label; each backbone's base hyperparameters are in its suite configs
#: (config/larv_<backbone>_<tasks>.yaml, ``larv_suite``)
BACKBONES = {
    "clip-vit-base-patch32": "ViT-B/32",
    "clip-vit-base-patch16": "ViT-B/16",
    "clip-vit-large-patch14": "ViT-L/14",
}
TASK_SETS = {"TA8": 8, "TALL14": 14, "TALL20": 20}
CORRUPTIONS = (
    "motion_blur",
    "impulse_noise",
    "gaussian_noise",
    "pixelate",
    "spatter",
    "contrast",
    "jpeg_compression",
)
CORRUPTION_LABELS = {
    "motion_blur": "Motion",
    "impulse_noise": "Impulse",
    "gaussian_noise": "Gaussian",
    "pixelate": "Pixelate",
    "spatter": "Spatter",
    "contrast": "Contrast",
    "jpeg_compression": "JPEG",
}
GENERALIZATION_SEEN = ("sun397", "stanford-cars", "resisc45", "dtd", "svhn", "gtsrb")
#: FusionBench's CLIP task pool plus per-sample correctness (same evaluation, same report): every
#: CLIP suite's cells record ``per_sample.json``, which the tables' paired intervals read (the
#: ``larv_clip-*`` suite configs name it themselves; the suites on FusionBench's configs get it here)
RECORDING_CLIP_TASKPOOL = {
    "taskpool": {"_target_": "fusion_bench_larv.RecordingCLIPVisionModelTaskPool"}
}
#: the same over FusionBench's older (v0.1) CLIP task pool configs (``type:
#: clip_vit_classification``, ``tasks``, ``clip_model``; the corrupted-data pool of Figures 3 and
#: 5), which FusionBench builds with its compat ``CLIPImageClassificationTaskPool``
RECORDING_COMPAT_CLIP_TASKPOOL = {
    "taskpool": {"_target_": "fusion_bench_larv.RecordingCLIPImageClassificationTaskPool"}
}


# ------------------------------------------------------------------------------------------------
# pools and suites
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolSpec:
    """Where a suite's runs come from: a primary config to derive from (its ``method`` override
    is dropped, the cells choose the method), optional model/task pool overrides, extra values
    merged at the top level, and extra config search-path folders."""

    parent: str = "fabric_model_fusion"
    modelpool: str | None = None
    taskpool: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    searchpath: tuple[str, ...] = ()
    label: str = ""


@dataclass(frozen=True)
class Suite:
    key: str  # folder name of its runs; stable
    label: str
    backbone: str  # "ViT-B/32" ...
    pool: PoolSpec
    column: str = ""  # short column label (e.g. "8 tasks", "Gaussian")
    group: str = ""  # e.g. the corruption
    seen_tasks: tuple[str, ...] = ()  # generalization: tasks whose models are merged
    mapped: bool = False  # pool replaced (--pools): tests / other pools
    generic: bool = False  # no pools of its own in the paper: --pools names them, label follows

    def larv_suite(self) -> dict[str, Any]:
        """The suite's ``larv_suite`` values (per-backbone base hyperparameters such as Iso-C's
        scaling), from its primary config; kept when the pools are mapped."""
        if "larv_suite" in self.pool.values:
            return dict(self.pool.values["larv_suite"])
        return _larv_suite(self.pool.parent, self.pool.searchpath)


def _larv_suite(parent: str, searchpath: tuple[str, ...] = ()) -> dict[str, Any]:
    if parent == "fabric_model_fusion":
        return {}
    try:
        doc = yaml.safe_load(find_primary(parent, searchpath).read_text()) or {}
    except FileNotFoundError:
        return {}
    return dict(doc.get("larv_suite") or {})


def clip_suite(backbone: str, tasks: str) -> Suite:
    label = BACKBONES[backbone]
    return Suite(
        key=f"{backbone}_{tasks}",
        label=f"{label}, {TASK_SETS[tasks]} tasks",
        backbone=label,
        pool=PoolSpec(parent=f"larv_{backbone}_{tasks}", label=f"larv_{backbone}_{tasks}"),
        column=f"{TASK_SETS[tasks]} tasks",
    )


def corruption_suite(corruption: str) -> Suite:
    return Suite(
        key=f"clip-vit-base-patch32_robustness_corrupted_{corruption}",
        label=f"ViT-B/32, corruption {corruption}",
        backbone="ViT-B/32",
        pool=PoolSpec(
            parent="clip-vit-base-patch32_robustness_corrupted",
            values={"corruption": corruption, **RECORDING_COMPAT_CLIP_TASKPOOL},
            label=f"clip-vit-base-patch32_robustness_corrupted corruption={corruption}",
        ),
        column=CORRUPTION_LABELS[corruption],
        group=corruption,
    )


GENERALIZATION = Suite(
    key="clip-vit-base-patch32_generalization_exp1",
    label="ViT-B/32, 6 seen + 2 unseen tasks",
    backbone="ViT-B/32",
    pool=PoolSpec(
        modelpool="CLIPVisionModelPool/clip-vit-base-patch32_generalization_exp1",
        taskpool="CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        values=RECORDING_CLIP_TASKPOOL,
        label="modelpool=…_generalization_exp1 taskpool=…_TA8",
    ),
    seen_tasks=GENERALIZATION_SEEN,
)
FLAN_T5 = Suite(
    key="flan-t5-base_glue_lora16",
    label="Flan-T5-base LoRA-16, 8 GLUE tasks",
    backbone="Flan-T5-base",
    pool=PoolSpec(
        modelpool="Seq2SeqLMPool/flan-t5-base_glue_lora16",
        taskpool="flan-t5_glue_text_generation",
        label="modelpool=Seq2SeqLMPool/flan-t5-base_glue_lora16 taskpool=flan-t5_glue_text_generation",
    ),
)


#: the benchmark's suite: any model pool / task pool pair (``--pools``; default the real-weights
#: testbed, recipe ``full``); its label is the pools' spec
BENCH = Suite(
    key="bench",
    label="testbed:full",
    backbone="",
    pool=PoolSpec(modelpool="LarvTestbed/full", taskpool="LarvTestbed/full", label="testbed:full"),
    generic=True,
)


def vit_suites(backbones: Sequence[str] = tuple(BACKBONES), tasks: Sequence[str] = ("TA8",)):
    return tuple(clip_suite(b, t) for b in backbones for t in tasks)


# ------------------------------------------------------------------------------------------------
# variants
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One set of variant definitions for every experiment and launcher."""

    slug: str  # folder name; no dots or commas
    label: str
    larv: Mapping[str, Any] | None  # None: the base merger alone (FusionBench's own config)
    mergers: tuple[str, ...] | None = None  # the mergers it runs for (None: every merger)
    #: a method config other than ``larv_<merger>`` (e.g. ``lines``), run over the merger's own
    #: FusionBench config as its ``base_method``
    method: str | None = None
    #: the choice (``larv/validation.yaml``: grid, growing rule, guard) of a value chosen on the
    #: suite's validation split
    chooses: str | None = None
    #: what data the row uses (None: data-free); tables show such rows in a block of their own
    uses_data: str | None = None
    #: the method fits its values on the suite's validation split (``validation_taskpool``)
    fits: bool = False
    #: a ``method`` row over the merger's base config as it is (LiNeS's rows set the merger's
    #: global coefficient to 1, which LiNeS replaces)
    base_as_is: bool = False

    def applies_to(self, merger: str) -> bool:
        return self.mergers is None or merger in self.mergers

    @property
    def short(self) -> str:
        """The slug without its ``larv-`` / ``sched-`` prefix (``tiered``, ``linear``, ...);
        ``--variant`` matches either."""
        return self.slug.split("-", 1)[1] if "-" in self.slug else self.slug


def _num(x: float) -> str:
    return f"{x:.1f}".replace(".", "p")


BASE = Variant("base", "base", None)
TIERED = Variant("larv-tiered", "+LARV tiered", {"gate": "tiered"})
CONTINUOUS = Variant("larv-continuous", "+LARV continuous", {"gate": "continuous"})
LARV = (TIERED, CONTINUOUS)
#: the continuous gate on w / median(w) (`w_normalize: median`; docs/method.md, "Median-normalized
#: scores"): scale-free, not the paper's rule
CONTINUOUS_MEDIAN = Variant(
    "larv-continuous-median",
    "+LARV continuous on w / median w (not in the paper)",
    {"gate": "continuous", "w_normalize": "median"},
)
MAIN_VARIANTS = (BASE, TIERED, CONTINUOUS)

#: Table 3 rows (r, e, c); (1, 1, 1) is the full composite score
ABLATION_ROWS = ((0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (1, 1, 1))


def ablation(r: int, e: int, c: int, gate: str, mergers: tuple[str, ...] | None = None) -> Variant:
    if (r, e, c) == (1, 1, 1):
        return TIERED if gate == "tiered" else CONTINUOUS
    return Variant(
        f"larv-{gate}-r{r}e{e}c{c}",
        f"+LARV {gate} (r{'✓' if r else '–'} e{'✓' if e else '–'} c{'✓' if c else '–'})",
        {"gate": gate, "use_depth_prior": bool(r), "use_info": bool(e), "use_conflict": bool(c)},
        mergers,
    )


#: Table 5 depth-only schedules (uniform = the base merger; composite = LARV)
SCHEDULES = ("linear", "tier12", "tier6", "tier3", "tier2", "lines")
SCHEDULE_LABELS = {
    "linear": "Linear",
    "tier12": "Tier 12",
    "tier6": "Tier 6",
    "tier3": "Tier 3",
    "tier2": "Tier 2",
    # the ramp α + β·ℓ/(L−1) at its default (α, β) = (0.5, 1): the linear ramp again. Not LiNeS
    # (faithful LiNeS: fusion_bench_larv.LiNeSAlgorithm, method=lines_ta)
    "lines": "depth ramp α + β·ℓ/(L−1) (`lines` schedule, α = 0.5, β = 1)",
}


def schedule(name: str) -> Variant:
    return Variant(
        f"sched-{name}", f"+{SCHEDULE_LABELS[name]}", {"gate": "schedule", "schedule": name}
    )


def custom(s: Sequence[float]) -> Variant:
    s = tuple(float(x) for x in s)
    if s == (1.0, 1.0, 1.0):
        return BASE  # bit for bit the base merger
    return Variant(
        "sched-custom_" + "_".join(_num(x) for x in s),
        "(" + ", ".join(f"{x:.1f}" for x in s) + ")",
        {"gate": "schedule", "schedule": "custom", "schedule_scales": list(s)},
    )


#: Table 6 rows (s_shallow, s_middle, s_deep), typed from the paper, with their group
TABLE6_ROWS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("Baseline", (1.0, 1.0, 1.0)),
    ("Uniform", (0.5, 0.5, 0.5)),
    ("Uniform", (1.5, 1.5, 1.5)),
    *(("Freeze Shallow Layers", (0.0, m, d)) for m in (0.0, 1.0, 1.5) for d in (0.5, 1.0, 1.5)),
    *(("Freeze Deep Layers", (s, m, 0.0)) for s in (0.0, 0.5, 1.5) for m in (0.5, 1.0, 1.5)),
)
#: Figure 4 grid: every (s_shallow, s_middle, s_deep) in {0.5, 1.0, 1.5}^3
FIG4_LEVELS = (0.5, 1.0, 1.5)
FIG4_GRID = tuple(itertools.product(FIG4_LEVELS, repeat=3))


#: the paper's Table 3 ablation under the tiered gate, without the full score (= tiered) and
#: r alone (= the depth-only ``tier3`` schedule): does e or c carry any signal without depth?
BENCH_ABLATION_ROWS = ((0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 1))
BENCH_ABLATION_MERGERS = ("ties", "iso_c", "iso_cts", "tsvm")
#: the abstract's reading (docs/method.md, "Per-task diagnostics"): each task vector its own
#: per-layer scales, the base merger then runs on the rescaled task vectors
PER_TASK = Variant(
    "larv-tiered-per-task",
    "+LARV tiered, per-task diagnostics (not the default)",
    {"gate": "tiered", "diagnostics": "per_task", "placement": "task_vectors"},
    ("ta", "ties", "iso_c", "tsvm"),
)

#: the data-using rows (a block of their own in the tables): faithful LiNeS with β chosen on the
#: validation split, its signed extension (not LiNeS), guarded LARV with δ chosen on it
LINES_VAL = Variant(
    "lines-val",
    "+LiNeS, β chosen on validation",
    {},
    method="lines",
    chooses="beta",
    uses_data="labelled validation examples",
)
SIGNED_RAMP_VAL = Variant(
    "signed-ramp-val",
    "+signed depth ramp (LiNeS α, β∈ℝ), chosen on validation",
    {},
    method="signed_depth_ramp",
    chooses="beta_signed",
    uses_data="labelled validation examples",
)
GUARDED = Variant(
    "larv-guarded",
    "+LARV tiered, δ chosen on validation (guarded)",
    {"gate": "tiered"},
    chooses="delta",
    uses_data="labelled validation examples",
)

#: the ceiling of per-block rescaling (issue 32): one scale per block of the merged update (and
#: one for the parameters outside the blocks), fitted on the validation labels; and one per task
#: vector and block, for the mergers whose merge is θ_0 + λ Σ_t τ_t
FITTED = Variant(
    "fitted-scales-val",
    "+per-block scales fitted on validation labels (ceiling)",
    {},
    method="LarvTestbed/fitted_block_scales",
    uses_data="labelled validation examples",
    fits=True,
    base_as_is=True,
)
FITTED_PER_TASK = replace(
    FITTED,
    slug="fitted-scales-val-per-task",
    label="+per-(task vector, block) scales fitted on validation labels",
    larv={"per_task": True},
    mergers=("ta", "simple_average"),
)

#: the benchmark's variants: alone, LARV's two gates, the continuous gate on median-normalized
#: scores, the depth-only schedules linear, tier3 and the ``lines`` ramp (not LiNeS), then the
#: rows that run for some mergers only: the tiered ablation and the per-task diagnostics
BENCH_VARIANTS = (
    BASE,
    TIERED,
    CONTINUOUS,
    CONTINUOUS_MEDIAN,
    *(schedule(s) for s in ("linear", "tier3", "lines")),
    *(ablation(*row, "tiered", BENCH_ABLATION_MERGERS) for row in BENCH_ABLATION_ROWS),
    PER_TASK,
    LINES_VAL,
    SIGNED_RAMP_VAL,
    GUARDED,
    FITTED,
    FITTED_PER_TASK,
)


def table6_variants() -> tuple[Variant, ...]:
    seen: dict[str, Variant] = {}
    for s in [row for _, row in TABLE6_ROWS] + list(FIG4_GRID):
        v = custom(s)
        seen.setdefault(v.slug, v)
    return tuple(seen.values())


# ------------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    suite: Suite
    merger: str  # a merger or a reference of the registry
    variant: Variant

    @property
    def is_reference(self) -> bool:
        return self.merger in registry().references

    @property
    def rel_dir(self) -> Path:
        return Path(self.suite.key) / self.merger / self.variant.slug

    @property
    def name(self) -> str:
        """Config option name of the cell in the generated ``cell`` group."""
        return f"{self.merger}__{self.variant.slug}"

    def run_dir(self, out: Path) -> Path:
        return Path(out) / "runs" / self.rel_dir

    def method(self) -> tuple[str, dict[str, Any]]:
        """FusionBench method config name and the values merged over it, from the registry: a
        reference's method; a base cell's ``base_method`` node of ``larv_<merger>`` (FusionBench's
        config + the block, interpolations unresolved: they resolve in the suite's config); a
        LARV cell's ``larv_<merger>`` with the variant's LARV keys."""
        reg = registry()
        if self.merger in reg.references:
            ref = reg.references[self.merger]
            return ref.method, dict(ref.values)
        if self.merger not in reg.mergers:
            raise KeyError(f"unknown merger {self.merger!r}; registered: {', '.join(reg.mergers)}")
        merger = reg.mergers[self.merger]
        if self.variant.larv is None:
            return merger.base_config, dict(merger.base_values)
        values = dict(self.variant.larv)
        if self.variant.chooses is not None:
            values["validation"] = validation_node(self.suite, self.variant.chooses)
        if self.variant.fits:
            values["validation_taskpool"] = validation_taskpool(self.suite)
        if self.variant.method is None:
            return merger.larv_config, values
        # another wrapper over the merger's own config; LiNeS replaces the global coefficient
        base = dict(merger.base_values)
        if "scaling_factor" in base and not self.variant.base_as_is:
            base["scaling_factor"] = 1.0
        return self.variant.method, {"base_method": base, **values}

    def method_defaults(self) -> list[dict[str, str]]:
        """Defaults-list entries beyond ``override /method``: a variant with its own method
        config takes the merger's FusionBench config as its ``base_method``."""
        if self.variant.method is None or self.merger in registry().references:
            return []
        return [
            {"override /method@method.base_method": registry().mergers[self.merger].base_config}
        ]

    def overrides(self) -> list[str]:
        """The same run as plain ``fusion_bench`` command-line overrides (for people), with
        interpolations resolved against the suite's ``larv_suite`` values."""
        cfg, values = self.method()
        if values:
            from omegaconf import OmegaConf

            doc = OmegaConf.create({"larv_suite": self.suite.larv_suite(), "v": values})
            values = OmegaConf.to_container(doc, resolve=True)["v"]
        extra = [f"{k.removeprefix('override /')}={v}" for d in self.method_defaults()
                 for k, v in d.items()]  # fmt: skip
        return [f"method={cfg}", *extra, *flat_overrides(values, "method.")]


def validation_node(suite: Suite, choice: str) -> dict[str, Any]:
    """``{taskpool, grid, grow, [guard,] uncovered}`` for a value chosen on validation: the
    suite's own task pool config (read from its YAML) on its held-out ``split: validation``, and
    the choice's grid, growing rule and guard and the coverage policy of
    ``larv/validation.yaml``."""
    from .registry import find_config

    protocol = yaml.safe_load(find_config(Path("larv") / "validation.yaml").read_text())
    if suite.pool.taskpool is None:
        raise ValueError(f"suite {suite.key} names no task pool: no validation split to choose on")
    taskpool = yaml.safe_load(
        find_config(Path("taskpool") / f"{suite.pool.taskpool}.yaml").read_text()
    )
    if "split" not in taskpool:
        raise ValueError(
            f"task pool {suite.pool.taskpool} has no `split` option: no validation split to "
            "choose on (the testbed task pools have one)"
        )
    taskpool.pop("defaults", None)
    taskpool.update(suite.pool.values.get("taskpool", {}))  # e.g. the pool's cache_dir
    taskpool.update(split="validation", val_size=int(protocol["val_size"]))
    return {"taskpool": taskpool, **protocol["choices"][choice], "uncovered": protocol["uncovered"]}


def validation_taskpool(suite: Suite) -> dict[str, Any]:
    """The suite's task pool config on its held-out ``split: validation``, as every choice on
    validation reads it (:func:`validation_node`; its grid, any of them, is dropped)."""
    return validation_node(suite, "delta")["taskpool"]


#: config nodes that are null in the method configs, so an override gives them whole
WHOLE_NODES = ("validation", "validation_taskpool")


def hydra_value(v: Any) -> str:
    """A value in Hydra's override grammar: dicts ``{k:v}``, lists ``[…]``, null, true/false,
    strings quoted."""
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def flat_overrides(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``["a.b=1", "c=[1, 2]"]`` (Hydra override syntax); a
    node of :data:`WHOLE_NODES` is given whole (``validation={taskpool:{…},grid:[…]}``)."""
    out = []
    for k, v in values.items():
        if isinstance(v, Mapping) and k in WHOLE_NODES:
            out.append(f"{prefix}{k}={hydra_value(v)}")
        elif isinstance(v, Mapping):
            out += flat_overrides(v, f"{prefix}{k}.")
        else:
            # lists as JSON, None as YAML's null (Hydra reads a bare None as the string "None")
            shown = json.dumps(v) if isinstance(v, list) else "null" if v is None else v
            out.append(f"{prefix}{k}={shown}")
    return out


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    suites: tuple[Suite, ...]
    mergers: tuple[str, ...] | str  # DEFAULT, PAPER (from the registry) or explicit names
    variants: tuple[Variant, ...]
    references: tuple[str, ...] = ()
    artefacts: tuple[str, ...] = ()  # files the collator writes
    grid: str = ""  # human description of the grid
    gpu_hours: str = ""
    disk: str = ""
    notes: str = ""
    paper: bool = True  # part of ``all`` (the paper's artefacts)

    def merger_list(self, include: Iterable[str] = ()) -> list[str]:
        reg = registry()
        include = set(include)
        if self.mergers == DEFAULT:
            ms = reg.default_mergers()
        elif self.mergers == PAPER:
            ms = reg.paper_mergers()
        else:
            ms = list(self.mergers)
        return ms + [m for m in reg.mergers if m in include and m not in ms]

    def cells(self, include_mergers: Iterable[str] = ()) -> list[Cell]:
        out = []
        for suite in self.suites:
            for ref in self.references:
                out.append(Cell(suite, ref, BASE))
            for merger in self.merger_list(include_mergers):
                for variant in self.variants:
                    if variant.applies_to(merger):
                        out.append(Cell(suite, merger, variant))
        return out


_B32_TA8 = clip_suite("clip-vit-base-patch32", "TA8")
_GB = "≈ 0.5 GB per CLIP ViT-B checkpoint, 1.7 GB per ViT-L/14"

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "table1",
            "Table 1: 8 tasks, per data set, ViT-B/32, B/16, L/14",
            vit_suites(),
            DEFAULT,
            MAIN_VARIANTS,
            references=("pretrained",),
            artefacts=("table1.md", "table1.csv"),
            grid="3 backbones × 8 tasks × ({M} mergers × {base, LARV tiered, LARV continuous} + pretrained)",
            gpu_hours="≈ 6 GPU-h on one A100/H100 (L/14 dominates; WUDI ≈ 5 min per merge)",
            disk=f"models: 9 × B/32 + 9 × B/16 + 9 × L/14 checkpoints (≈ 25 GB); data: the 8 test sets (≈ 3 GB); {_GB}",
        ),
        Experiment(
            "table2",
            "Table 2 (averages) and Tables 7 / 9 (per data set): 8 / 14 / 20 tasks",
            vit_suites(tasks=tuple(TASK_SETS)),
            DEFAULT,
            MAIN_VARIANTS,
            references=("pretrained",),
            artefacts=(
                "table2.md",
                "table2.csv",
                "table7.md",
                "table7.csv",
                "table9.md",
                "table9.csv",
            ),
            grid="3 backbones × {8, 14, 20} tasks × ({M} mergers × {base, tiered, continuous} + pretrained)",
            gpu_hours="≈ 40 GPU-h (20-task L/14 evaluations dominate)",
            disk="models: 21 checkpoints per backbone (≈ 70 GB in all); data: 20 test sets (≈ 20 GB)",
        ),
        Experiment(
            "table3",
            "Table 3: ablation of r, e, c (ViT-B/32, 8 tasks)",
            (_B32_TA8,),
            ABLATION_MERGERS,
            (BASE, *(ablation(*rec, g) for rec in ABLATION_ROWS for g in ("tiered", "continuous"))),
            artefacts=("table3.md", "table3.csv"),
            grid="ViT-B/32 TA8 × 4 mergers × (base + 5 (r,e,c) rows × {tiered, continuous})",
            gpu_hours="≈ 1 GPU-h",
            disk="ViT-B/32 TA8: 9 checkpoints (≈ 4 GB) + 8 test sets (≈ 3 GB)",
            notes="The paper does not say which gate Table 3 used: both are run. With r, e, c all "
            "off, w ≡ 1: the continuous gate gives s ≡ 1 (the base merger), the tiered gate a "
            "uniform scale.",
        ),
        Experiment(
            "table5",
            "Table 5: scaling strategies (8 tasks, three backbones)",
            vit_suites(),
            ABLATION_MERGERS,
            (BASE, TIERED, CONTINUOUS, *(schedule(s) for s in SCHEDULES)),
            artefacts=("table5.md", "table5.csv"),
            grid="3 backbones × 4 mergers × {uniform (= base), composite tiered, composite "
            "continuous, linear, tier12, tier6, tier3, tier2, lines}",
            gpu_hours="≈ 8 GPU-h",
            disk="as Table 1 (≈ 28 GB)",
        ),
        Experiment(
            "table6",
            "Table 6 and Figure 4: depth-only (s_shallow, s_middle, s_deep) grid on ViT-B/32",
            (_B32_TA8,),
            ABLATION_MERGERS,
            (BASE, *[v for v in table6_variants() if v is not BASE]),
            artefacts=("table6.md", "table6.csv", "fig4_tiered_grid.png"),
            grid="ViT-B/32 TA8 × 4 mergers × (Table 6's 21 rows ∪ Figure 4's {0.5, 1, 1.5}³: "
            "45 triples, (1, 1, 1) = base)",
            gpu_hours="≈ 3 GPU-h",
            disk="ViT-B/32 TA8 (≈ 7 GB)",
        ),
        Experiment(
            "fig2",
            "Figure 2: per-layer e, c, s by depth (ViT-B/32, B/16, 8 tasks)",
            vit_suites(("clip-vit-base-patch32", "clip-vit-base-patch16")),
            DEFAULT,
            LARV,
            artefacts=("fig2_<suite>.png", "fig2.csv"),
            grid="{B/32, B/16} TA8 × {M} mergers × {tiered, continuous} (same runs as Table 1)",
            gpu_hours="included in Table 1 (≈ 1 GPU-h alone)",
            disk="B/32 + B/16 TA8 (≈ 12 GB)",
        ),
        Experiment(
            "fig3",
            "Figure 3 / 5: seven corruptions (ViT-B/32, Cars, EuroSAT, RESISC45, GTSRB)",
            tuple(corruption_suite(c) for c in CORRUPTIONS),
            PAPER,
            MAIN_VARIANTS,
            artefacts=("fig3.md", "fig3.csv", "fig3_corruptions.png", "fig5_corruption_delta.png"),
            grid="7 corruptions × 5 mergers × {base, tiered, continuous}",
            gpu_hours="≈ 3 GPU-h",
            disk="5 ViT-B/32 checkpoints (≈ 2.5 GB) + the corrupted test splits of 4 data sets (≈ 6 GB)",
        ),
        Experiment(
            "table4",
            "Table 4: generalization, 6 seen + 2 unseen tasks (ViT-B/32)",
            (GENERALIZATION,),
            PAPER,
            MAIN_VARIANTS,
            references=("pretrained", "fisher", "regmean", "regmean_plusplus", "adamerging"),
            artefacts=("table4.md", "table4.csv"),
            grid="5 mergers × {base, tiered, continuous} + pretrained, Fisher, RegMean, RegMean++, "
            "layer-wise AdaMerging",
            gpu_hours="≈ 2 GPU-h (AdaMerging's 1000 test-time steps ≈ 1 h)",
            disk="7 ViT-B/32 checkpoints (≈ 3.5 GB) + 6 train sets, 8 test sets (≈ 10 GB)",
            notes="Fisher, RegMean, RegMean++ use training data, AdaMerging unlabelled test data.",
        ),
        Experiment(
            "table8",
            "Table 8: Flan-T5-base LoRA, 8 GLUE tasks",
            (FLAN_T5,),
            PAPER,
            MAIN_VARIANTS,
            references=("pretrained",),
            artefacts=("table8.md", "table8.csv"),
            grid="5 mergers × {base, tiered, continuous} + pretrained",
            gpu_hours="≈ 1 GPU-h",
            disk="flan-t5-base (≈ 1 GB) + 8 LoRA adapters (≈ 30 MB) + GLUE validation sets (≈ 1 GB)",
        ),
        Experiment(
            "bench",
            "Benchmark: every merger alone, with LARV (tiered, continuous, continuous on w / median "
            "w) and with the depth-only schedules linear, tier3 and the `lines` ramp, on one model "
            "pool / task pool pair; the tiered ablation (TIES, Iso-C, Iso-CTS, TSV-M) and per-task "
            "diagnostics (TA, TIES, Iso-C, TSV-M)",
            (BENCH,),
            DEFAULT,
            BENCH_VARIANTS,
            references=("pretrained", "finetuned", "testbed_adamerging"),
            artefacts=(
                "bench.md",
                "bench.csv",
                "forest_bench.png",
                "fig2_bench.png",
                "bench_layers.csv",
            ),
            grid="{M} mergers × {base, tiered, continuous, continuous-median, linear, tier3, lines} "
            "+ 4 mergers × 5 tiered ablation rows + 4 mergers × per-task diagnostics "
            "+ pretrained and fine-tuned references, on the pools of --pools (default testbed:full)",
            gpu_hours="testbed full on 2 CPU cores: ≈ 1 min per cell (WUDI's merge ≈ 40 min)",
            disk="the testbed build (python lab/scripts/build_testbed.py --recipe full)",
            paper=False,
        ),
    )
}
ALL = "all"


def expand(names: Sequence[str], include_mergers: Iterable[str] = ()) -> dict[str, list[Cell]]:
    """experiment -> its cells (``all`` expands to every paper experiment)."""
    wanted: list[str] = []
    for n in names or [ALL]:
        for m in [x for x, e in EXPERIMENTS.items() if e.paper] if n == ALL else [n]:
            if m not in wanted:
                wanted.append(m)
    unknown = [n for n in wanted if n not in EXPERIMENTS]
    if unknown:
        raise KeyError(f"unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}, all")
    return {n: EXPERIMENTS[n].cells(include_mergers) for n in wanted}


def unique_cells(groups: Mapping[str, Sequence[Cell]]) -> list[Cell]:
    """Cells of several experiments, each folder once (experiments share runs)."""
    seen: dict[Path, Cell] = {}
    for cells in groups.values():
        for c in cells:
            seen.setdefault(c.rel_dir, c)
    return list(seen.values())


def by_suite(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    """Cells grouped by suite key, in order (one multirun / one in-process session each)."""
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.suite.key, []).append(c)
    return groups


def filter_cells(
    cells: Sequence[Cell],
    suites: Sequence[str] = (),
    mergers: Sequence[str] = (),
    variants: Sequence[str] = (),
) -> list[Cell]:
    """Keep cells whose suite key / merger / variant slug match any of the glob patterns."""

    def ok(values: Sequence[str], pats: Sequence[str]) -> bool:
        return not pats or any(fnmatch.fnmatchcase(v, p) for v in values for p in pats)

    return [
        c
        for c in cells
        if ok([c.suite.key], suites)
        and ok([c.merger], mergers)
        and ok([c.variant.slug, c.variant.short], variants)
    ]


def pool_slug(label: str) -> str:
    """A folder-safe name for a pool spec: ``testbed:full_seed1`` -> ``testbed-full_seed1``; a
    spec naming a folder keeps only the folder's name (``testbed:/a/b/mine-1f2e`` ->
    ``testbed-mine-1f2e``)."""
    kind, _, rest = label.partition(":")
    if rest.startswith(("/", "~", ".")):
        rest = Path(rest.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9_]+", "-", f"{kind}-{rest}" if rest else kind).strip("-") or "pools"


def map_pools(cells: Sequence[Cell], pool: PoolSpec | Sequence[PoolSpec] | None) -> list[Cell]:
    """Point every cell at another pool (tests, or your own pools); folders keep their names.

    Several pools (e.g. two build seeds of the testbed) repeat each cell of a generic suite (the
    benchmark's) once per pool, as suites ``<key>-<pool slug>`` side by side in one output
    folder; the paper's suites take one pool."""
    if pool is None:
        return list(cells)
    if not isinstance(pool, PoolSpec):
        pools = list(pool)
        if len(pools) == 1:
            return map_pools(cells, pools[0])
        fixed = sorted({c.suite.key for c in cells if not c.suite.generic})
        if fixed:
            raise ValueError(
                f"several --pools apply to the benchmark's suite only, not to {', '.join(fixed)}"
            )
        slugs = [pool_slug(p.label) for p in pools]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"--pools names the same pools twice: {[p.label for p in pools]}")
        out: list[Cell] = []
        for p, slug in zip(pools, slugs, strict=True):
            for c in map_pools(cells, p):
                out.append(replace(c, suite=replace(c.suite, key=f"{c.suite.key}-{slug}")))
        return out
    suites: dict[str, Suite] = {}
    out = []
    for c in cells:
        s = suites.get(c.suite.key)
        if s is None:
            # the suite's per-backbone values (larv_suite) go along, so a mapped suite runs the
            # same base hyperparameters as the suite it stands in for
            larv_suite = c.suite.larv_suite()
            values = {**pool.values, "larv_suite": larv_suite} if larv_suite else pool.values
            mapped = replace(pool, values=values)
            if c.suite.generic:
                s = replace(c.suite, pool=mapped, label=pool.label or c.suite.label)
            else:
                s = replace(c.suite, pool=mapped, mapped=True)
            suites[c.suite.key] = s
        out.append(replace(c, suite=s))
    return out


def parse_pool(spec: str) -> PoolSpec:
    """``tiny_clip:ROOT`` | ``testbed:RECIPE[:CACHE_DIR]`` | ``testbed:FOLDER`` (a built testbed)
    | ``pools:MODELPOOL,TASKPOOL[,CONFIG_DIR]``."""
    kind, _, rest = spec.partition(":")
    if kind == "tiny_clip":
        root = Path(rest).expanduser().resolve()
        from ..testbed.tiny_clip import MODELPOOL_CONFIG, TASKPOOL_CONFIG

        return PoolSpec(
            modelpool=MODELPOOL_CONFIG,
            taskpool=TASKPOOL_CONFIG,
            values=RECORDING_CLIP_TASKPOOL,
            searchpath=(str(root / "config"),),
            label=spec,
        )
    if kind == "testbed":
        if rest and Path(rest).expanduser().is_dir():
            # a built testbed folder (e.g. over a registered source): self-contained for
            # merging and evaluation; the recipe-named configs only supply the pool classes
            folder = str(Path(rest).expanduser().resolve())
            return PoolSpec(
                modelpool="LarvTestbed/ci",
                taskpool="LarvTestbed/ci",
                values={"modelpool": {"testbed_dir": folder}, "taskpool": {"testbed_dir": folder}},
                label=spec,
            )
        recipe, _, cache = rest.partition(":")
        recipe = recipe or "ci"
        values: dict[str, Any] = {}
        if cache:
            cache = str(Path(cache).expanduser().resolve())
            values = {"modelpool": {"cache_dir": cache}, "taskpool": {"cache_dir": cache}}
        return PoolSpec(
            modelpool=f"LarvTestbed/{recipe}",
            taskpool=f"LarvTestbed/{recipe}",
            values=values,
            label=spec,
        )
    if kind == "pools":
        parts = rest.split(",")
        if len(parts) not in (2, 3):
            raise ValueError(f"--pools pools:MODELPOOL,TASKPOOL[,CONFIG_DIR], got {spec!r}")
        sp = (str(Path(parts[2]).expanduser().resolve()),) if len(parts) == 3 else ()
        return PoolSpec(modelpool=parts[0], taskpool=parts[1], searchpath=sp, label=spec)
    raise ValueError(
        f"unknown pool spec {spec!r} (tiny_clip:ROOT, testbed:RECIPE[:CACHE], testbed:FOLDER, "
        "pools:…)"
    )
