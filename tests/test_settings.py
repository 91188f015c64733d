"""Every bad LARV setting fails at construction with a message naming the key."""

from __future__ import annotations

import pytest

from fusion_bench_larv.settings import LarvConfigError, LarvSettings


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"beta": 1.0}, "beta"),
        ({"alpha": 0.7, "beta": 0.6}, "alpha"),
        ({"eta": -1}, "eta"),
        ({"rho": -0.1}, "rho"),
        ({"zeta": -2}, "zeta"),
        ({"gamma": 0}, "gamma"),
        ({"levels": [0.5, -1.0, 1.5]}, "levels"),
        ({"levels": [0.5, 1.5]}, "levels"),
        ({"levels": ["a", 1, 2]}, "levels"),
        ({"gate": "sigmoid"}, "gate"),
        ({"schedule": "tier4"}, "schedule"),
        ({"placement": "both"}, "placement"),
        ({"spectrum": "lanczos"}, "spectrum"),
        ({"outside_blocks": "drop"}, "outside_blocks"),
        ({"schedule": "custom", "schedule_scales": [0.5, 1.5]}, "schedule_scales"),
        ({"schedule": "uniform", "schedule_scales": [1.0, 2.0]}, "schedule_scales"),
        ({"schedule": "tier6", "schedule_scales": [1, 2, 3]}, "schedule_scales"),
        ({"schedule": "linear", "schedule_scales": [1.0]}, "schedule_scales"),
        ({"rank": 0}, "rank"),
        ({"eps": 0}, "eps"),
        ({"use_info": "yes"}, "use_info"),
        ({"report_name": "a/b.json"}, "report_name"),
    ],
)
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(LarvConfigError, match=f"`{key}`"):
        LarvSettings(**kwargs)


def test_unknown_key():
    with pytest.raises(LarvConfigError, match="tempo"):
        LarvSettings.from_mapping({"tempo": 1})


def test_good_values_normalised():
    s = LarvSettings(levels=[0, 1, 2], schedule="custom", schedule_scales=[0, 1, 1.5])
    assert s.levels == (0.0, 1.0, 2.0) and s.schedule_scales == (0.0, 1.0, 1.5)
    assert LarvSettings(schedule="lines", schedule_scales=[-0.5, 2]).schedule_scales == (-0.5, 2.0)
    assert LarvSettings().to_dict()["levels"] == [0.5, 1.0, 1.5]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.2}, "alpha"),
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"alpha": 0.5, "beta": 0.5}, "alpha"),  # α ≥ β
        ({"alpha": float("nan")}, "alpha"),
        ({"beta": float("inf")}, "beta"),
        ({"alpha": True}, "alpha"),
        ({"alpha": "0.3"}, "alpha"),
        ({"gamma": -3.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"eta": float("-inf")}, "eta"),
        ({"levels": [0.5, 1.0, 1.5, 2.0]}, "levels"),
        ({"levels": [-0.5, 1.0, 1.5]}, "levels"),
        ({"levels": "0.5,1,1.5"}, "levels"),
        ({"levels": 1.0}, "levels"),
        ({"eps": -1e-8}, "eps"),
        ({"oversample": -1}, "oversample"),
        ({"rank": 1.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"seed": "0"}, "seed"),
        ({"use_conflict": 1}, "use_conflict"),
        ({"use_depth_prior": None}, "use_depth_prior"),
        ({"gate": "Tiered"}, "gate"),
        ({"schedule": "custom", "schedule_scales": [0.5, -1.0, 1.5]}, "schedule_scales"),
        ({"schedule": "custom", "schedule_scales": [0.5, 1.0, 1.5, 2.0]}, "schedule_scales"),
        ({"schedule": "tier2", "schedule_scales": [0.5, 1.0, 1.5]}, "schedule_scales"),
        ({"schedule": "lines", "schedule_scales": [0.5]}, "schedule_scales"),
        ({"schedule": "lines", "schedule_scales": [0.5, float("nan")]}, "schedule_scales"),
        ({"layer_pattern": 3}, "layer_pattern"),
        ({"report_name": ""}, "report_name"),
    ],
)
def test_more_bad_values_name_the_key(kwargs, key):
    with pytest.raises(LarvConfigError, match=f"`{key}`"):
        LarvSettings(**kwargs)


def test_config_error_is_a_value_error():
    assert issubclass(LarvConfigError, ValueError)


def test_from_mapping_names_every_unknown_key_and_rejects_extra():
    with pytest.raises(LarvConfigError) as err:
        LarvSettings.from_mapping({"gate": "tiered", "tempo": 1, "alhpa": 0.3})
    assert "alhpa" in str(err.value) and "tempo" in str(err.value)
    with pytest.raises(LarvConfigError, match="extra"):
        LarvSettings.from_mapping({"extra": {}})
    with pytest.raises(LarvConfigError, match="`beta`"):  # known keys are validated as well
        LarvSettings.from_mapping({"beta": 2})


def test_defaults_are_the_spec_defaults():
    s = LarvSettings()
    assert (s.gate, s.alpha, s.beta, s.levels, s.gamma) == (
        "tiered",
        1 / 3,
        2 / 3,
        (0.5, 1.0, 1.5),
        3.0,
    )
    assert (s.eta, s.rho, s.zeta) == (1.0, 0.5, 1.0)
    assert s.use_depth_prior and s.use_info and s.use_conflict
    assert (s.placement, s.spectrum, s.outside_blocks, s.layer_pattern) == (
        "merged",
        "exact",
        "nearest",
        None,
    )
    assert (s.eps, s.report_name) == (1e-8, "larv_layers.json")


def test_to_dict_round_trips_through_from_mapping():
    s = LarvSettings(
        gate="schedule", schedule="custom", schedule_scales=[0, 1, 1], alpha=0.25, beta=0.75,
        levels=[0.2, 1, 1.8], spectrum="randomized", rank=1, outside_blocks="neutral",
    )  # fmt: skip
    d = s.to_dict()
    assert "extra" not in d and d["schedule_scales"] == [0.0, 1.0, 1.0]
    assert LarvSettings.from_mapping(d) == s


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eta": 0, "rho": 0, "zeta": 0},  # exponents may be 0 (factor off)
        {"levels": [0, 0, 0]},  # freeze everything
        {"alpha": 0.01, "beta": 0.99},
        {"schedule": "tier6", "schedule_scales": [0, 0.2, 0.4, 0.6, 0.8, 1.0]},
        {"schedule": "uniform", "schedule_scales": [0.0]},
        {"schedule": "linear"},
        {"layer_pattern": r"^blocks\.(\d+)\."},
    ],
)
def test_good_values_pass(kwargs):
    LarvSettings(**kwargs)
