"""The experiment registry (larv_lab.reproduce): mergers and their hyperparameters come
from the YAML configs only, the dry run lists every run of every artefact with the counts the
paper's grids give, a sample of those runs composes with Hydra exactly as the CLI will (no run,
no download), and the paper anchors are well formed. No fusion_bench subprocess here (see
test_reproduce_e2e.py)."""

from __future__ import annotations

import ast
import itertools
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import fusion_bench_larv
from fusion_bench_larv.config_paths import larv_config_dir
from larv_lab.reproduce import __main__ as cli
from larv_lab.reproduce import experiments as X
from larv_lab.reproduce import sweep
from larv_lab.reproduce.anchors import ANCHORS_FILE
from larv_lab.reproduce.registry import (
    display_label,
    find_primary,
    lab_config_dir,
    registry,
    use_config_root,
)

# the default merger list: every registered merger marked default (LOT needs data: opt-in)
M = len(registry().default_mergers())


def _expected_counts() -> dict[str, int]:
    """Grid sizes from the paper's experiment descriptions (docs/reproducing.md, per artefact)."""
    table6_rows = {  # typed from the paper's Table 6
        (1, 1, 1), (0.5, 0.5, 0.5), (1.5, 1.5, 1.5),
        *((0, m, d) for m in (0, 1, 1.5) for d in (0.5, 1, 1.5)),
        *((s, m, 0) for s in (0, 0.5, 1.5) for m in (0.5, 1, 1.5)),
    }  # fmt: skip
    assert len(table6_rows) == 21
    triples = table6_rows | set(itertools.product((0.5, 1, 1.5), repeat=3))  # + Figure 4
    return {
        # backbones × task sets × (mergers × {base, tiered, continuous} + pretrained)
        "table1": 3 * 1 * (M * 3 + 1),
        "table2": 3 * 3 * (M * 3 + 1),
        # 4 mergers × (base + 5 (r, e, c) rows × 2 gates)
        "table3": 4 * (1 + 5 * 2),
        # 3 backbones × 4 mergers × (base, tiered, continuous, 6 depth-only schedules)
        "table5": 3 * 4 * (3 + 6),
        # 4 mergers × the (s_s, s_m, s_d) triples ((1, 1, 1) is the base run)
        "table6": 4 * len(triples),
        # 2 backbones × mergers × {tiered, continuous}
        "fig2": 2 * M * 2,
        # 7 corruptions × 5 mergers × 3
        "fig3": 7 * 5 * 3,
        # 5 mergers × 3 + pretrained, Fisher, RegMean, RegMean++, AdaMerging
        "table4": 5 * 3 + 5,
        # 5 mergers × 3 + pretrained
        "table8": 5 * 3 + 1,
    }


def test_dry_run_lists_every_run_with_the_grid_counts(capsys, tmp_path):
    assert cli.main(["--dry-run", "all", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+): (\d+) runs", text, re.M)}
    expected = _expected_counts()
    assert counts == expected
    # shared runs counted once: Table 1 and Figure 2 are inside Table 2; Tables 3, 5, 6 share
    # their base / tiered / continuous runs with Table 2
    distinct = (
        expected["table2"]
        + expected["table3"] - 4 * 3
        + expected["table5"] - 3 * 4 * 3
        + expected["table6"] - 4
        + expected["fig3"] + expected["table4"] + expected["table8"]
    )  # fmt: skip
    total = re.search(r"^total: (\d+) distinct runs", text, re.M)
    assert total and int(total[1]) == distinct
    # every run is listed, with its folder and a plain fusion_bench command
    listed = re.findall(r"^  \[todo\] (\S+)$", text, re.M)
    assert len(listed) == sum(expected.values())
    assert "clip-vit-large-patch14_TALL20/iso_c/larv-continuous" in listed
    # Iso-C's per-backbone scaling comes from the suite config (larv_suite.iso_c_scaling): the
    # LARV command needs no base override, the base command shows the resolved value
    l14 = "fusion_bench --config-name larv_clip-vit-large-patch14_TALL20"
    assert f"{l14} method=larv_iso_c method.gate=continuous\n" in text
    assert f"{l14} method=isotropic_merging/iso_c method.scaling_factor=1.5\n" in text
    assert (
        "fusion_bench --config-name clip-vit-base-patch32_robustness_corrupted corruption=spatter"
        in text
    )
    # one multirun per suite
    assert text.count("--config-name reproduce_suite -m +cell=") == 9 + 7 + 1 + 1


def test_folders_are_unique_and_deterministic():
    cells = X.unique_cells(X.expand(["all"]))
    assert len({c.rel_dir for c in cells}) == len(cells)
    assert len({(c.suite.key, c.name) for c in cells}) == len(cells)
    for c in cells:
        assert re.fullmatch(r"[A-Za-z0-9_\-]+", c.name), c.name  # a Hydra option name
    again = X.unique_cells(X.expand(["all"]))
    assert [c.rel_dir for c in again] == [c.rel_dir for c in cells]


def _config_copy(tmp_path: Path) -> Path:
    root = tmp_path / "config"
    # one edited tree holding both the plugin's configs (method/) and the lab's (larv/)
    shutil.copytree(larv_config_dir(), root)
    shutil.copytree(lab_config_dir(), root, dirs_exist_ok=True)
    return root


def test_registry_is_read_from_the_yaml(tmp_path):
    reg = registry()
    assert set(reg.default_mergers()) == {"ta", "ties", "iso_c", "iso_cts", "tsvm", "wudi",
                                          "simple_average"}  # fmt: skip
    assert reg.paper_mergers() == ["ta", "ties", "iso_c", "iso_cts", "tsvm"]
    assert not reg.mergers["lot"].data_free and reg.mergers["ta"].data_free
    trees = (larv_config_dir(), lab_config_dir())  # the plugin's configs, or the lab's own
    for name, m in reg.mergers.items():
        assert any((t / "method" / f"{m.larv_config}.yaml").is_file() for t in trees)
        assert m.larv_config == f"larv_{name}"
    assert reg.mergers["ties"].base_config == "ties_merging"
    assert reg.mergers["ties"].base_values == {
        "scaling_factor": 0.3, "threshold": 20, "merge_func": "sum",
    }  # fmt: skip
    # a larv config built on another (larv_ties_streamed on larv_ties): that base, its values
    # with the block merged over them
    assert reg.mergers["ties_streamed"].base_config == "ties_merging"
    assert reg.mergers["ties_streamed"].base_values == {
        **reg.mergers["ties"].base_values,
        "_target_": "larv_lab.testbed.ties_streamed.StreamedTiesMergingAlgorithm",
    }
    assert reg.mergers["iso_c"].base_values == {
        "scaling_factor": "${oc.select:larv_suite.iso_c_scaling,1.30}"
    }
    # a merger added later: one method config and one registry line; it joins every default
    # experiment, while lot (default: false) joins only when named
    root = _config_copy(tmp_path)
    shutil.copy(root / "method" / "larv_ta.yaml", root / "method" / "larv_newmerger.yaml")
    reg_file = root / "larv" / "mergers.yaml"
    line = "  newmerger: {label: New merger, paper: false, default: true}\n"
    reg_file.write_text(reg_file.read_text().replace("\nmergers:\n", "\nmergers:\n" + line))
    doc = yaml.safe_load((root / "larv" / "mergers.yaml").read_text())
    assert "newmerger" in doc["mergers"]
    with use_config_root(root):
        t1 = X.EXPERIMENTS["table1"]
        assert "newmerger" in t1.merger_list() and "lot" not in t1.merger_list()
        assert "lot" in t1.merger_list(include=["lot"])
        cell = X.Cell(X.clip_suite("clip-vit-base-patch16", "TA8"), "newmerger", X.TIERED)
        assert cell.method() == ("larv_newmerger", {"gate": "tiered"})
        assert registry().label("newmerger") == display_label("newmerger") == "New merger"
    assert "newmerger" not in registry().mergers
    assert display_label("nosuchmerger") == "nosuchmerger"  # shown as it is


def test_opt_in_merger_runs_when_named(capsys, tmp_path):
    # FusionBench's other mergers (DARE, MagMax, Model Stock, DOGE-TA) are opt-in registry lines:
    # outside the default list (above), in Table 1 when named
    assert cli.main(["table1", "--merger", "dare_ties", "--dry-run", "--out", str(tmp_path)]) == 0
    assert (
        "table1: 9 runs" in (text := capsys.readouterr().out)
        and "clip-vit-base-patch32_TA8/dare_ties/larv-tiered\n         fusion_bench --config-name "
        "larv_clip-vit-base-patch32_TA8 method=larv_dare_ties method.gate=tiered\n"
        in text
    )


def _compose(cells, out: Path) -> dict[str, dict]:
    """Each cell's config as the launchers compose it (``+cell=<name>`` on the sweep folder),
    method node resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    out_cfg = {}
    for scells in X.by_suite(cells).values():
        sweep_dir = sweep.write_sweep(scells[0].suite, scells, out)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(sweep_dir), version_base=None):
            for c in scells:
                cfg = compose(sweep.PRIMARY, overrides=[f"+cell={c.name}"])
                out_cfg[str(c.rel_dir)] = OmegaConf.to_container(cfg.method, resolve=True)
        GlobalHydra.instance().clear()
    return out_cfg


@pytest.mark.slow
def test_base_cell_runs_the_larv_configs_base_method_node(tmp_path):
    # base cell's method == the LARV cell's base_method, resolved in the suite's config: every
    # merger on one CLIP suite and on Flan-T5; on the other suites Iso-C (its per-backbone
    # scaling from larv_suite.iso_c_scaling, the one suite value a merger reads) and TA
    suites = [*X.vit_suites(tasks=("TALL20",)), X.corruption_suite("spatter"), X.FLAN_T5]
    every = (suites[0].key, X.FLAN_T5.key)
    mergers = {s.key: registry().mergers if s.key in every else ("ta", "iso_c") for s in suites}
    cells = [X.Cell(s, m, v) for s in suites for m in mergers[s.key] for v in (X.BASE, X.TIERED)]
    methods = _compose(cells, tmp_path)
    for s in suites:
        want_iso_c = float(s.larv_suite().get("iso_c_scaling", 1.30))
        for m in mergers[s.key]:
            base = methods[f"{s.key}/{m}/base"]
            larv = methods[f"{s.key}/{m}/larv-tiered"]
            assert larv["_target_"] == "fusion_bench_larv.LARVAlgorithm"
            assert base == larv["base_method"], (s.key, m)
        assert methods[f"{s.key}/iso_c/base"]["scaling_factor"] == want_iso_c
    # the lab's own configs over FusionBench's TIES and Iso-CTS: the same node, another _target_
    for lab, own, target in [("ties_streamed", "ties", "ties_streamed.StreamedTiesMergingAlgorithm"),
                             ("iso_cts_retry", "iso_cts", "iso_cts_retry.IsoCTSWithRetry")]:  # fmt: skip
        ours, theirs = (methods[f"{X.FLAN_T5.key}/{m}/base"] for m in (lab, own))
        assert ours == {**theirs, "_target_": f"larv_lab.testbed.{target}"}
    scalings = {s.key: s.larv_suite()["iso_c_scaling"] for s in X.vit_suites(tasks=("TALL20",))}
    assert sorted(scalings.values()) == [1.3, 1.4, 1.5]  # the paper's, App. C.2
    # a suite mapped to other pools keeps its larv_suite values (same hyperparameters)
    l14 = X.clip_suite("clip-vit-large-patch14", "TA8")
    mapped = X.map_pools([X.Cell(l14, "iso_c", X.BASE)], X.parse_pool("testbed:ci"))
    assert mapped[0].suite.pool.values["larv_suite"]["iso_c_scaling"] == 1.5
    assert _compose(mapped, tmp_path / "m")[f"{l14.key}/iso_c/base"]["scaling_factor"] == 1.5
    cfg, values = X.Cell(l14, "tsvm", X.custom((0, 1.5, 0.5))).method()
    assert values["schedule"] == "custom" and values["schedule_scales"] == [0.0, 1.5, 0.5]
    assert X.custom((1, 1, 1)) is X.BASE


@pytest.mark.slow
def test_a_changed_yaml_value_changes_the_cells(tmp_path):
    # hyperparameters live only in YAML: edit larv_ta.yaml (and a suite's Iso-C scaling) in a
    # copy of the config tree and both the base and the LARV cells follow
    root = _config_copy(tmp_path)
    path = root / "method" / "larv_ta.yaml"
    path.write_text(path.read_text().replace("scaling_factor: 0.3", "scaling_factor: 0.45"))
    suite_cfg = root / "larv_clip-vit-base-patch16_TA8.yaml"
    suite_cfg.write_text(suite_cfg.read_text().replace("iso_c_scaling: 1.40", "iso_c_scaling: 1.7"))
    suite = X.clip_suite("clip-vit-base-patch16", "TA8")
    cells = [X.Cell(suite, m, v) for m in ("ta", "iso_c") for v in (X.BASE, X.TIERED)]
    before = _compose(cells, tmp_path / "before")
    with use_config_root(root):
        assert find_primary(suite.pool.parent) == suite_cfg
        assert X.Cell(suite, "ta", X.BASE).method() == ("task_arithmetic", {"scaling_factor": 0.45})
        after = _compose(cells, tmp_path / "after")
    assert before["clip-vit-base-patch16_TA8/ta/base"]["scaling_factor"] == 0.3
    assert after["clip-vit-base-patch16_TA8/ta/base"]["scaling_factor"] == 0.45
    assert (
        after["clip-vit-base-patch16_TA8/ta/larv-tiered"]["base_method"]["scaling_factor"] == 0.45
    )
    assert before["clip-vit-base-patch16_TA8/iso_c/base"]["scaling_factor"] == 1.4
    assert after["clip-vit-base-patch16_TA8/iso_c/base"]["scaling_factor"] == 1.7
    assert (
        after["clip-vit-base-patch16_TA8/iso_c/larv-tiered"]["base_method"]["scaling_factor"] == 1.7
    )


# keyword / dict-key names of base-merger hyperparameters (FusionBench's method configs)
HYPERPARAMETERS = {
    "scaling_factor", "threshold", "merge_func", "iter_num", "num_exemplars",
    "common_space_fraction", "iso_c_scaling", "hparams",
}  # fmt: skip


def test_no_base_merger_hyperparameter_in_python():
    """Base-merger hyperparameters live in YAML only: no Python file of the plugin or the lab
    passes one as a keyword argument or writes one as a dict key with a literal value."""
    pkg = Path(fusion_bench_larv.__file__).parent
    lab = Path(X.__file__).resolve().parents[1]  # larv_lab/
    found = []
    for path in sorted([*pkg.rglob("*.py"), *lab.rglob("*.py")]):
        rel = path.as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            pairs = []
            if isinstance(node, ast.Call):
                pairs = [(k.arg, k.value) for k in node.keywords]
            elif isinstance(node, ast.Dict):
                pairs = [
                    (k.value, v)
                    for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant)
                ]
            for key, value in pairs:
                if key in HYPERPARAMETERS and not (
                    isinstance(value, ast.Constant) and isinstance(value.value, str)
                ):
                    literal = isinstance(value, (ast.Constant, ast.Dict, ast.Tuple, ast.List))
                    if literal:
                        found.append(f"{rel}:{node.lineno}: {key}")
    assert found == []
    # and the old homes of the numbers are gone
    assert not (pkg / "benchmark.py").exists()
    text = (lab / "reproduce" / "experiments.py").read_text()
    assert "1.30" not in text and "1.40" not in text and "hparams" not in text


def _sample() -> list[X.Cell]:
    """Per experiment: its first suite's base run, first LARV variant and last variant of one
    merger, and every reference; plus every merger once on the largest suite."""
    picked: dict = {}
    for cells in X.expand(["all"]).values():
        suite = cells[0].suite.key
        merger = next(c.merger for c in cells if not c.is_reference)
        mine = [c for c in cells if c.suite.key == suite and c.merger == merger]
        for c in [
            *mine[:2],
            mine[-1],
            *(c for c in cells if c.is_reference and c.suite.key == suite),
        ]:
            picked.setdefault(c.rel_dir, c)
        last = cells[-1]  # another suite of the same experiment (TALL20, spatter, ...)
        picked.setdefault(last.rel_dir, last)
    for c in X.EXPERIMENTS["table2"].cells():
        if c.suite.key == "clip-vit-large-patch14_TALL20" and c.variant is X.TIERED:
            picked.setdefault(c.rel_dir, c)
    return list(picked.values())


@pytest.mark.slow
def test_a_sample_of_the_runs_composes(tmp_path):
    sample = _sample()
    assert len(sample) >= 25
    assert cli.check_compose(sample, tmp_path) == []


def test_paper_anchors_are_well_formed():
    doc = json.loads(ANCHORS_FILE.read_text())
    assert doc["approximate"] is True and "paper" in doc["source"]
    known_suites = {c.suite.key for c in X.unique_cells(X.expand(["all"]))}
    mergers = set(registry().mergers) | set(registry().references)
    seen = set()
    for a in doc["anchors"]:
        key = (a["table"], a["suite"], a["merger"], a["variant"], a["task"])
        assert key not in seen, key
        seen.add(key)
        assert a["suite"] in known_suites and a["merger"] in mergers, a
        assert 0 <= a["value"] <= 100
        if a.get("derived"):
            assert a["variant"] == "base"
    # a few cells read straight off the paper text
    idx = {
        (a["table"], a["suite"], a["merger"], a["variant"], a["task"]): a for a in doc["anchors"]
    }
    b32 = "clip-vit-base-patch32_TA8"
    assert idx["table1", b32, "ta", "larv-best", "average"]["value"] == 74.7
    assert idx["table2", b32, "ta", "larv-best", "average"]["value"] == 73.8  # the known slip
    assert idx["table6", b32, "tsvm", "sched-custom_1p5_1p5_0p0", "average"]["value"] == 66.4
    assert idx["table3", b32, "ties", "ablation-r1e1c1", "average"]["value"] == 75.9


def test_pool_mapping_keeps_folders_and_replaces_pools(tmp_path):
    cells = X.EXPERIMENTS["fig3"].cells()
    mapped = X.map_pools(cells, X.parse_pool(f"testbed:ci:{tmp_path}"))
    assert [c.rel_dir for c in mapped] == [c.rel_dir for c in cells]
    pool = mapped[0].suite.pool
    assert pool.modelpool == "LarvTestbed/ci" and pool.values["modelpool"]["cache_dir"] == str(
        tmp_path.resolve()
    )
    with pytest.raises(ValueError):
        X.parse_pool("nonsense:x")
    # the benchmark's suite takes the pools' label; its folders keep the key
    bench = X.map_pools(X.EXPERIMENTS["bench"].cells(), X.parse_pool("testbed:quick"))
    assert {c.suite.label for c in bench} == {"testbed:quick"}
    assert {str(c.rel_dir.parent.parent) for c in bench} == {"bench"}
    assert not any(c.suite.mapped for c in bench)


def test_benchmark_grid_is_one_experiment(capsys, tmp_path):
    # the old `python -m fusion_bench_larv.benchmark --mergers ta ties iso_c` grid, as one
    # experiment of the pipeline: 3 mergers × 7 variants (the 6 of the old grid and the continuous
    # gate on median-normalized scores), the tiered ablation (5 rows, TIES and Iso-C here), the
    # per-task diagnostics (all three), the three data-using rows (all three), the ceiling (all
    # three; its per-task reading: Task Arithmetic) + the pretrained and fine-tuned rows
    args = ["bench", "--pools", "testbed:full", "--launcher", "inprocess", "--out", str(tmp_path),
            "--merger", "ta", "ties", "iso_c", "pretrained", "finetuned"]  # fmt: skip
    groups, cells = cli.select(cli.build_parser().parse_args(args))
    assert len(cells) == 3 * 7 + 2 * 5 + 3 + 3 * 3 + 3 + 1 + 2
    assert [c.variant.slug for c in cells if c.merger == "ties"] == [
        "base", "larv-tiered", "larv-continuous", "larv-continuous-median", "sched-linear",
        "sched-tier3", "sched-lines", "larv-tiered-r0e1c0", "larv-tiered-r0e0c1",
        "larv-tiered-r0e1c1", "larv-tiered-r1e1c0", "larv-tiered-r1e0c1", "larv-tiered-per-task",
        "lines-val", "signed-ramp-val", "larv-guarded", "fitted-scales-val",
    ]  # fmt: skip
    assert [c.merger for c in cells if c.variant == X.FITTED_PER_TASK] == ["ta"]
    assert not any("-r0" in c.variant.slug or "-r1" in c.variant.slug for c in cells
                   if c.merger == "ta")  # the ablation runs for the paper's four only  # fmt: skip
    assert cli.main(["--dry-run", *args]) == 0
    text = capsys.readouterr().out
    assert "bench: 49 runs (0 done, 49 to run)" in text
    assert (
        "fusion_bench modelpool=LarvTestbed/full taskpool=LarvTestbed/full method=ties_merging "
        "method.scaling_factor=0.3 method.threshold=20 method.merge_func=sum" in text
    )
    # bench is not a paper artefact: `all` leaves it out, naming it adds it
    assert "bench" not in X.expand(["all"]) and "bench" in X.expand(["all", "bench"])
    # short variant names select by slug suffix
    sel = X.filter_cells(X.EXPERIMENTS["bench"].cells(), variants=["linear", "larv-tiered"])
    assert {c.variant.slug for c in sel} == {"sched-linear", "larv-tiered"}


def test_median_normalized_continuous_variant_is_its_own_row():
    # `w_normalize: median` (not the paper's rule) is a bench variant of its own, with its own
    # folder, LARV keys and a table label that says what it is
    v = X.CONTINUOUS_MEDIAN
    assert v in X.EXPERIMENTS["bench"].variants
    assert (v.slug, v.short) == ("larv-continuous-median", "continuous-median")
    assert v.larv == {"gate": "continuous", "w_normalize": "median"}
    # the variant filter: the exact short name picks it alone, `continuous` does not pick it
    cells = X.EXPERIMENTS["bench"].cells()
    assert {c.variant.slug for c in X.filter_cells(cells, variants=["continuous-median"])} == {
        v.slug
    }
    assert {c.variant.slug for c in X.filter_cells(cells, variants=["continuous"])} == {
        "larv-continuous"
    }


def test_median_normalized_continuous_row_in_the_bench_table(tmp_path):
    # the bench table (layouts.per_task_table, as the collator calls it) from hand-written cell
    # reports: the variant gets a row of its own, labelled by the variant's own label
    from larv_lab.reproduce.layouts import per_task_table
    from larv_lab.reproduce.results import Results

    cells = X.filter_cells(
        X.EXPERIMENTS["bench"].cells(),
        mergers=["ta"],
        variants=["base", "continuous", "continuous-median"],
    )
    acc = {
        "base": (0.80, 0.60),
        "larv-continuous": (0.70, 0.70),
        "larv-continuous-median": (0.90, 0.80),
    }
    for c in cells:
        c.run_dir(tmp_path).mkdir(parents=True)
        a, b = acc[c.variant.slug]
        report = {"t1": {"accuracy": a}, "t2": {"accuracy": b}}
        (c.run_dir(tmp_path) / "program_report.json").write_text(json.dumps(report))
    res = Results(cells, tmp_path)
    order = [v.slug for v in X.BENCH_VARIANTS]
    table = per_task_table("bench", "bench", cells, res, None, order).markdown()
    rows = [line for line in table.splitlines() if line.startswith("| Task Arithmetic")]
    assert rows == [
        "| Task Arithmetic | 80.0 | 60.0 | 70.0 |",
        "| Task Arithmetic + LARV continuous | 70.0 (-10.0) | 70.0 (+10.0) | 70.0 (+0.0) |",
        "| Task Arithmetic + LARV continuous on w / median w (not in the paper) | 90.0 (+10.0) "
        "| 80.0 (+20.0) | 85.0 (+15.0) |",
    ]


def test_several_pools_make_one_bench_suite_each():
    cells = X.EXPERIMENTS["bench"].cells()
    specs = [X.parse_pool("testbed:full"), X.parse_pool("testbed:full_seed1")]
    mapped = X.map_pools(cells, specs)
    assert len(mapped) == 2 * len(cells)
    keys = {c.suite.key for c in mapped}
    assert keys == {"bench-testbed-full", "bench-testbed-full_seed1"}
    assert {c.suite.pool.modelpool for c in mapped} == {
        "LarvTestbed/full",
        "LarvTestbed/full_seed1",
    }
    assert X.map_pools(cells, specs[:1]) == X.map_pools(cells, specs[0])  # one: key "bench"
    with pytest.raises(ValueError, match="benchmark's suite only"):
        X.map_pools(X.EXPERIMENTS["table1"].cells(), specs)
    with pytest.raises(ValueError, match="twice"):
        X.map_pools(cells, [specs[0], specs[0]])
    assert X.pool_slug("testbed:/a/b/mine-1f2e/") == "testbed-mine-1f2e"


def test_suite_filter_applies_to_the_mapped_suites():
    args = ["bench", "--pools", "testbed:full", "testbed:full_seed1", "--merger", "ta",
            "--variant", "base", "--suite", "bench-testbed-full_seed1"]  # fmt: skip
    _, cells = cli.select(cli.build_parser().parse_args(args))
    assert [str(c.rel_dir) for c in cells] == ["bench-testbed-full_seed1/ta/base"]


def test_the_collator_registry_holds_every_experiment_and_its_tables():
    # collate.ARTEFACTS, the one registry of what each experiment writes: one entry per
    # experiment, a table (TableSpec) per markdown file the experiment lists (the benchmark's is
    # built by bench_table.bench_artefacts)
    from larv_lab.reproduce.collate import ARTEFACTS, TableSpec

    assert set(ARTEFACTS) == set(X.EXPERIMENTS)
    for name, exp in X.EXPERIMENTS.items():
        tables = {f"{a.name}.md" for a in ARTEFACTS[name] if isinstance(a, TableSpec)}
        if name == "bench":
            tables.add("bench.md")
        assert tables == {f for f in exp.artefacts if f.endswith(".md")}, name
