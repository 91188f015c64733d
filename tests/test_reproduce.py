"""The paper-reproduction registry (fusion_bench_larv.reproduce): the dry run lists every run
of every artefact with the counts the paper's grids give, a sample of those runs composes with
Hydra exactly as the CLI will (no run, no download), and the paper anchors are well formed.
No fusion_bench subprocess here (see test_reproduce_e2e.py)."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from fusion_bench_larv import benchmark
from fusion_bench_larv.reproduce import __main__ as cli
from fusion_bench_larv.reproduce import experiments as X
from fusion_bench_larv.reproduce.collate import ANCHORS_FILE

# the default merger list: every registered merger except the ones that need data
M = len([m for m in benchmark.MERGERS if m not in X.OPTIONAL_MERGERS])


def _expected_counts() -> dict[str, int]:
    """Grid sizes from the paper's experiment descriptions (issue 4 / LARV-SPEC.md)."""
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
    assert "fusion_bench --config-name larv_clip-vit-large-patch14_TALL20" in text
    assert "method=larv_iso_c method.gate=continuous method.base_method.scaling_factor=1.5" in text
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


def test_registry_follows_benchmark_mergers(monkeypatch):
    monkeypatch.setitem(benchmark.MERGERS, "lot", ("lot_merging", "larv_lot", {}))
    monkeypatch.setitem(benchmark.MERGERS, "newmerger", ("task_arithmetic", "larv_ta", {}))
    t1 = X.EXPERIMENTS["table1"]
    assert "newmerger" in t1.merger_list() and "lot" not in t1.merger_list()  # lot needs data
    assert "lot" in t1.merger_list(include=["lot"])
    cell = X.Cell(X.clip_suite("clip-vit-base-patch16", "TA8"), "lot", X.TIERED)
    assert cell.method()[0] == "larv_lot"


def test_base_hyperparameters_per_backbone():
    for backbone, (_, iso_c) in X.BACKBONES.items():
        suite = X.clip_suite(backbone, "TALL20")
        assert X.Cell(suite, "iso_c", X.BASE).method() == (
            "isotropic_merging/iso_c",
            {"scaling_factor": iso_c},
        )
        cfg, values = X.Cell(suite, "iso_c", X.CONTINUOUS).method()
        assert cfg == "larv_iso_c"
        assert values == {"gate": "continuous", "base_method": {"scaling_factor": iso_c}}
    cfg, values = X.Cell(suite, "tsvm", X.custom((0, 1.5, 0.5))).method()
    assert values["schedule"] == "custom" and values["schedule_scales"] == [0.0, 1.5, 0.5]
    assert X.custom((1, 1, 1)) is X.BASE


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
    mergers = set(benchmark.MERGERS) | set(X.REFERENCES) | {"finetuned", "simple_average"}
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
