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
