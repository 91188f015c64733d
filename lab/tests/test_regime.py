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


def test_task_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        regime_card({"a": 1.0}, {"a": 2.0, "b": 3.0}, {}, GOALS)
    with pytest.raises(ValueError, match="ta: tasks"):
        regime_card({"a": 1.0}, {"a": 2.0}, {"ta": {"b": 1.0}}, GOALS)


def test_targets_come_from_yaml():
    t = targets()
    assert set(GOALS) <= set(t) and "ta" in t["data_free_mergers"]
