"""Every bad LARV setting fails at construction with a message naming the key."""

from __future__ import annotations

import warnings

import pytest

from fusion_bench_larv.core.settings import LarvConfigError, LarvSettings
from fusion_bench_larv.errors import LarvWarning


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
    s = LarvSettings(
        levels=[0, 1, 2], gate="schedule", schedule="custom", schedule_scales=[0, 1, 1.5]
    )
    assert s.levels == (0.0, 1.0, 2.0) and s.schedule_scales == (0.0, 1.0, 1.5)
    lines = LarvSettings(gate="schedule", schedule="lines", schedule_scales=[-0.5, 2])
    assert lines.schedule_scales == (-0.5, 2.0)
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


def test_settings_are_read_only_once_built_and_replace_validates():
    import copy
    import dataclasses
    import pickle

    s = LarvSettings(levels=[0.4, 1, 1.6])  # normalised by validation, the one write after init
    assert s.levels == (0.4, 1.0, 1.6)
    with pytest.raises(LarvConfigError, match=r"read-only.*alg\.gate = 'nope'.*replace") as err:
        s.gate = "nope"  # would otherwise reach a run without validation
    assert isinstance(err.value, AttributeError)
    with pytest.raises(LarvConfigError, match="no key `gama`.*did you mean `gamma`"):
        s.gama = 3
    with pytest.raises(LarvConfigError, match="read-only"):
        del s.gate
    assert s.gate == "tiered" and not hasattr(s, "gama")
    t = dataclasses.replace(s, gate="continuous")  # the way to new settings: validated again
    assert (t.gate, s.gate) == ("continuous", "tiered")
    with pytest.raises(LarvConfigError, match="`gate`"):
        dataclasses.replace(s, gate="nope")
    assert copy.deepcopy(s) == s == pickle.loads(pickle.dumps(s))
    s.normalise()  # checking again is allowed (it only normalises, idempotently)


def test_from_mapping_names_every_unknown_key_and_rejects_extra():
    with pytest.raises(LarvConfigError) as err:
        LarvSettings.from_mapping({"gate": "tiered", "tempo": 1, "alhpa": 0.3})
    assert "alhpa" in str(err.value) and "tempo" in str(err.value)
    with pytest.raises(LarvConfigError, match="extra"):
        LarvSettings.from_mapping({"extra": {}})
    with pytest.raises(LarvConfigError, match="`beta`"):  # known keys are validated as well
        LarvSettings.from_mapping({"beta": 2})


def test_defaults_are_the_documented_defaults():  # docs/method.md, "Config names"
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
        {"gate": "schedule", "schedule": "tier6", "schedule_scales": [0, 0.2, 0.4, 0.6, 0.8, 1.0]},
        {"gate": "schedule", "schedule": "uniform", "schedule_scales": [0.0]},
        {"gate": "schedule", "schedule": "linear"},
        {"layer_pattern": r"^blocks\.(\d+)\."},
    ],
)
def test_good_values_pass(kwargs):
    LarvSettings(**kwargs)


# -- every message names the key and the value and says what is allowed ---------
@pytest.mark.parametrize(
    ("kwargs", "key", "value", "allowed"),
    [
        ({"alpha": 0.0}, "alpha", "0.0", "(0, 1)"),
        ({"alpha": 0.7, "beta": 0.6}, "alpha", "0.7", "smaller than beta"),
        ({"eta": -1}, "eta", "-1", ">= 0"),
        ({"gamma": 0}, "gamma", "0", "> 0"),
        ({"levels": [0.5, -1, 1.5]}, "levels", "-1", ">= 0"),
        ({"levels": [0.5, None, 1.5]}, "levels", "None", "finite number"),
        ({"gate": "sigmoid"}, "gate", "'sigmoid'", "tiered, continuous, schedule"),
        ({"schedule": "tier4"}, "schedule", "'tier4'", "tier3"),
        ({"placement": "both"}, "placement", "'both'", "task_vectors"),
        ({"outside_blocks": "drop"}, "outside_blocks", "'drop'", "neutral"),
        ({"spectrum": "lanczos"}, "spectrum", "'lanczos'", "randomized"),
        ({"schedule": "custom", "schedule_scales": [1]}, "schedule_scales", "[1]", "exactly 3"),
        ({"schedule": "uniform", "schedule_scales": [1, 1]}, "schedule_scales", "[1, 1]", "exactly 1"),
        ({"schedule": "lines", "schedule_scales": [1, 2, 3]}, "schedule_scales", "[1, 2, 3]", "exactly 2"),
        ({"rank": 0}, "rank", "0", "integer >= 1"),
        ({"oversample": 2.5}, "oversample", "2.5", "integer >= 0"),
        ({"layer_pattern": r"layers\.(\d+"}, "layer_pattern", r"'layers\\.(\\d+'", "not a valid regex"),
        ({"layer_pattern": r"layers\.\d+\."}, "layer_pattern", r"'layers\\.\\d+\\.'", "(?P<idx>"),
        ({"layer_pattern": ""}, "layer_pattern", "''", "non-empty regex"),
        ({"report_name": ".."}, "report_name", "'..'", "plain file name"),
        ({"stats_cache_dir": 3}, "stats_cache_dir", "3", "directory path"),
    ],
)  # fmt: skip
def test_messages_name_key_value_and_what_is_allowed(kwargs, key, value, allowed):
    with pytest.raises(LarvConfigError) as err:
        LarvSettings(**kwargs)
    msg = str(err.value)
    assert f"`{key}`" in msg and value in msg and allowed in msg, msg


@pytest.mark.parametrize(
    ("kwargs", "suggestion"),
    [({"gate": "tierd"}, "tiered"), ({"schedule": "tier_3"}, "tier3"), ({"placement": "merge"}, "merged")],
)  # fmt: skip
def test_misspelt_choice_gets_a_suggestion(kwargs, suggestion):
    with pytest.raises(LarvConfigError, match=f"did you mean `{suggestion}`"):
        LarvSettings(**kwargs)


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("gama", "gamma"), ("alhpa", "alpha"), ("use_conflicts", "use_conflict"),
     ("layer_patern", "layer_pattern"), ("report_dri", "report_dir"), ("base_methd", "base_method")],
)  # fmt: skip
def test_unknown_keys_rejected_with_did_you_mean(typo, meant):
    from fusion_bench_larv import LARVAlgorithm

    ta = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
    kwargs = {typo: 1} if typo == "base_methd" else {"base_method": ta, typo: 1}
    with pytest.raises(LarvConfigError, match=f"`{typo}` \\(did you mean `{meant}`\\?\\)"):
        LARVAlgorithm(**kwargs)
    if meant not in ("report_dir", "base_method"):
        with pytest.raises(LarvConfigError, match=f"did you mean `{meant}`"):
            LarvSettings.from_mapping({typo: 1})


def test_unknown_key_far_from_any_gets_no_wrong_suggestion():
    with pytest.raises(LarvConfigError) as err:
        LarvSettings.from_mapping({"zzzzzz": 1})
    assert "`zzzzzz`" in str(err.value) and "did you mean" not in str(err.value)


def test_hydra_composed_typo_reaches_the_class_and_is_rejected():
    from pathlib import Path

    import fusion_bench
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    fb_config = str(Path(fusion_bench.__file__).resolve().parent.parent / "fusion_bench_config")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=fb_config, version_base=None):
            cfg = compose(config_name="fabric_model_fusion",
                          overrides=["method=larv_ta", "+method.gama=3"])  # fmt: skip
            with pytest.raises(Exception) as err:
                instantiate(cfg.method)
    finally:
        GlobalHydra.instance().clear()
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, LarvConfigError) for x in chain) or "LarvConfigError" in str(err.value)
    assert "did you mean `gamma`" in str(err.value)


# -- the wrapped base method is checked at construction too ----------------------------------------
TA_TARGET = "fusion_bench.method.TaskArithmeticAlgorithm"


@pytest.mark.parametrize(
    ("base", "match"),
    [
        (None, "needs `base_method`"),
        ("task_arithmetic", "`base_method` = 'task_arithmetic'"),
        ({"scaling_factor": 0.3}, "_target_"),
        ({"_target_": 3}, "class path string"),
        ({"_target_": "fusion_bench.method.TaskArithmetic", "scaling_factor": 0.3},
         "did you mean .*`fusion_bench.method.TaskArithmeticAlgorithm`"),
        ({"_target_": "no_such_package.Merger"}, "cannot import module 'no_such_package'"),
        ({"_target_": "torch.nn.Linear"}, "not a FusionBench BaseAlgorithm"),
        ({"_target_": TA_TARGET}, r"misses required argument\(s\) \['scaling_factor'\]"),
        ({"_target_": TA_TARGET, "scaling_factr": 0.3}, "`scaling_factr` \\(did you mean `scaling_factor`"),
        ({"_target_": "fusion_bench.method.ISO_C_Merge", "scaling_factor": 1.3, "rank": 2},
         "unknown `base_method` key `rank`"),
    ],
)  # fmt: skip
def test_bad_base_method_fails_at_construction(base, match):
    from fusion_bench_larv import LARVAlgorithm

    with pytest.raises(LarvConfigError, match=match):
        LARVAlgorithm(base_method=base)


def test_good_base_methods_and_fusion_bench_meta_keys_pass():
    from fusion_bench.method import TaskArithmeticAlgorithm
    from omegaconf import OmegaConf

    from fusion_bench_larv import LARVAlgorithm

    LARVAlgorithm(base_method={"_target_": TA_TARGET, "scaling_factor": 0.3, "inplace": True})
    LARVAlgorithm(base_method=OmegaConf.create({"_target_": TA_TARGET, "scaling_factor": 0.3}))
    LARVAlgorithm(base_method=TaskArithmeticAlgorithm(scaling_factor=0.3))
    # FusionBench's serialisation keys are not LARV settings and are not rejected
    LARVAlgorithm(base_method={"_target_": TA_TARGET, "scaling_factor": 0.3}, _usage_="x")
    # an extra argument a **kwargs merger accepts is allowed when it is no typo of a real one
    LARVAlgorithm(base_method={"_target_": TA_TARGET, "scaling_factor": 0.3, "profile": True})


def test_construction_error_leaves_the_output_directory_alone(tmp_path):
    from fusion_bench_larv import LARVAlgorithm

    (tmp_path / "larv_layers.json").write_text("old")
    with pytest.raises(LarvConfigError):
        LARVAlgorithm(
            base_method={"_target_": TA_TARGET, "scaling_factor": 0.3},
            report_dir=str(tmp_path),
            gamma=-1,
        )
    assert [p.name for p in tmp_path.iterdir()] == ["larv_layers.json"]
    assert (tmp_path / "larv_layers.json").read_text() == "old"
    with pytest.raises(LarvConfigError, match="`report_dir`"):
        LARVAlgorithm(base_method={"_target_": TA_TARGET, "scaling_factor": 0.3}, report_dir=5)


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(schedule_scales=[1.2]), "`schedule_scales` = [1.2]"),
        (dict(schedule="linear", gate="continuous"), "`schedule` = 'linear'"),
        (dict(spectrum_tail="uniform"), "`spectrum_tail` = 'uniform'"),
        (dict(w_normalize="median"), "`w_normalize` = 'median'"),
        (dict(w_normalize="median", gate="schedule"), "`w_normalize` = 'median'"),
    ],
)
def test_keys_without_effect_warn_and_name_the_key(kwargs, named):
    with pytest.warns(LarvWarning, match="without effect") as rec:
        LarvSettings(**kwargs)
    assert named in str(rec[0].message)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(gate="schedule", schedule="uniform", schedule_scales=[1.2]),
        dict(gate="schedule", schedule="linear"),
        dict(spectrum="randomized", spectrum_tail="uniform"),
        dict(gate="continuous", w_normalize="median"),
        dict(gate="continuous", w_normalize="none"),
    ],
)
def test_keys_in_use_do_not_warn(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LarvSettings(**kwargs)


# -- w_normalize: the continuous gate on w / median(w) (not the paper's rule) -------------------
def test_w_normalize_default_is_the_papers_rule_and_median_is_accepted():
    assert LarvSettings().w_normalize == "none"
    s = LarvSettings(gate="continuous", w_normalize="median")
    assert s.to_dict()["w_normalize"] == "median"
    assert LarvSettings.from_mapping(s.to_dict()) == s


@pytest.mark.parametrize(
    ("value", "shown"),
    [("mean", "'mean'"), ("Median", "'Median'"), (None, "None"), (True, "True"), (1.0, "1.0")],
)
def test_bad_w_normalize_names_key_value_and_choices(value, shown):
    with pytest.raises(LarvConfigError) as err:
        LarvSettings(gate="continuous", w_normalize=value)
    msg = str(err.value)
    assert "`w_normalize`" in msg and shown in msg and "one of none, median" in msg, msg


def test_misspelt_w_normalize_gets_a_suggestion():
    with pytest.raises(LarvConfigError, match="did you mean `median`"):
        LarvSettings(gate="continuous", w_normalize="medain")


def test_w_normalize_under_the_tiered_gate_says_why_it_has_no_effect():
    with pytest.warns(LarvWarning, match="tiered gate reads only the order of w") as rec:
        LarvSettings(gate="tiered", w_normalize="median")
    assert "used only with `gate: continuous`" in str(rec[0].message)
