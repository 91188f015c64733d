"""The regime card (larv_lab.reproduce.regime) on hand-computed numbers."""

from __future__ import annotations

import pytest

from larv_lab.reproduce.regime import regime_card, targets

GOALS = {
    "min_finetune_gain_pp": 15.0,
    "max_ta_normalized": 0.85,
    "min_base_spread_pp": 5.0,
    "ta_merger": "ta",
    "data_free_mergers": ["ta", "ties", "iso_c"],
}


def test_hand_computed_card():
    pre = {"a": 40.0, "b": 60.0}  # mean 50
    ft = {"a": 80.0, "b": 100.0}  # mean 90: gain 40
    bases = {
        "ta": {"a": 60.0, "b": 80.0},  # normalized (0.75 + 0.8) / 2 = 0.775, mean 70
        "ties": {"a": 70.0, "b": 90.0},  # mean 80
        "iso_c": {"a": 72.0, "b": 98.0},  # mean 85
        "lot": {"a": 0.0, "b": 0.0},  # not data-free: ignored
    }
    card = regime_card(pre, ft, bases, GOALS)
    assert card["num_tasks"] == 2
    assert card["finetune_gain_pp"] == pytest.approx(40.0)
    assert card["ta_normalized_accuracy"] == pytest.approx(0.775)
    assert card["base_spread_pp"] == pytest.approx(15.0)
    assert (card["best_base"], card["worst_base"]) == ("iso_c", "ta")
    assert card["meets"] == {"finetune_gain": True, "ta_normalized": True, "base_spread": True}
    assert card["all_met"] and card["missing_mergers"] == []


def test_misses_and_missing_mergers_are_reported():
    pre, ft = {"a": 80.0}, {"a": 90.0}  # gain 10 < 15
    card = regime_card(pre, ft, {"ta": {"a": 88.0}, "ties": {"a": 86.0}}, GOALS)
    assert card["meets"]["finetune_gain"] is False
    assert card["meets"]["ta_normalized"] is False  # 88 / 90 > 0.85
    assert card["meets"]["base_spread"] is False  # 2 pp
    assert card["missing_mergers"] == ["iso_c"] and not card["all_met"]
    alone = regime_card(pre, ft, {"ties": {"a": 86.0}}, GOALS)
    assert alone["ta_normalized_accuracy"] is None and alone["base_spread_pp"] is None
    assert alone["meets"]["ta_normalized"] is None


def test_a_stand_in_counts_as_its_merger_only_where_that_merger_has_no_row():
    pre, ft = {"a": 40.0}, {"a": 90.0}
    stand_ins = {"ties_streamed": "ties"}
    bases = {"ta": {"a": 60.0}, "ties_streamed": {"a": 50.0}, "iso_c": {"a": 70.0}}
    card = regime_card(pre, ft, bases, GOALS, stand_ins=stand_ins)
    assert card["base_averages"] == {"ta": 60.0, "ties": 50.0, "iso_c": 70.0}
    assert card["stand_ins"] == {"ties": "ties_streamed"} and card["missing_mergers"] == []
    assert card["base_spread_pp"] == pytest.approx(20.0) and card["all_met"]
    own = regime_card(
        pre, ft, {**bases, "ties": {"a": 65.0}}, GOALS, stand_ins=stand_ins
    )  # FusionBench's own row wins
    assert own["base_averages"]["ties"] == 65.0 and "stand_ins" not in own


def test_task_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        regime_card({"a": 1.0}, {"a": 2.0, "b": 3.0}, {}, GOALS)
    with pytest.raises(ValueError, match="ta: tasks"):
        regime_card({"a": 1.0}, {"a": 2.0}, {"ta": {"b": 1.0}}, GOALS)


def test_targets_come_from_yaml():
    t = targets()
    assert set(GOALS) <= set(t) and "ta" in t["data_free_mergers"]
    from larv_lab.reproduce.registry import registry

    assert set(registry().stand_ins().values()) <= set(t["data_free_mergers"])


def test_pilot_card_reads_the_build_report_and_the_base_cells(tmp_path):
    """lab/scripts/pilot_regime_card.py on a hand-made build report and two base cells."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "pilot_regime_card.py"
    spec = importlib.util.spec_from_file_location("pilot_regime_card", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    build, results = tmp_path / "decoder_full-abc", tmp_path / "cells"
    build.mkdir()
    report = {"recipe": {"finetune_lr": 3e-5},
              "tasks": {"a": {"pretrained_acc": 0.1, "finetuned_acc": 0.8},
                        "b": {"pretrained_acc": 0.0, "finetuned_acc": 0.4}}}  # fmt: skip
    (build / "report.json").write_text(json.dumps(report))
    for merger, acc in {
        "ta": (0.4, 0.1),
        "ties_streamed": (0.6, 0.2),
        "pretrained": (0.1, 0.0),
    }.items():
        cell = results / "runs" / "bench" / merger / "base"
        cell.mkdir(parents=True)
        rows = {"a": {"accuracy": acc[0]}, "b": {"accuracy": acc[1]}, "average": {}}
        (cell / "program_report.json").write_text(json.dumps(rows))
    assert module.main([str(build), str(results)]) == 0
    card = json.loads((results / "regime_pilot.json").read_text())
    assert card["finetune_lr"] == 3e-5 and card["finetune_gain_pp"] == pytest.approx(55.0)
    assert card["ta_normalized_accuracy"] == pytest.approx((0.5 + 0.25) / 2)
    assert card["base_averages"] == {"ta": pytest.approx(25.0), "ties": pytest.approx(40.0)}
    assert card["stand_ins"] == {"ties": "ties_streamed"}
    (results / "runs" / "other").mkdir()  # two pilots' cells in one folder: refused
    with pytest.raises(SystemExit, match="one pilot"):
        module.main([str(build), str(results)])
