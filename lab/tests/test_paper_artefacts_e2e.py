"""Every paper artefact's command end to end, offline, on tiny stand-in pools.

- Figures 3 and 5 take the harness's own route (no ``--pools``): FusionBench's
  ``clip-vit-base-patch32_robustness_corrupted`` suite, whose task pool is FusionBench's older
  config form, on a tiny stand-in of that pool (its model and task pool configs under the same
  names, with the same keys; the tiny CLIP suite's models, and its test images corrupted per
  corruption into splits named after them).
- Tables 2 (with 7 and 9), 3, 4, 5 and 8 run on the tiny CLIP suite (``--pools tiny_clip:…``).
- Table 1, Figure 2 and Table 6 / Figure 4 run in ``test_reproduce_e2e.py``.

Both commands run in this process with the in-process launcher: one model pool per suite, no
process start (CI time).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from larv_lab.reproduce import __main__ as cli
from larv_lab.reproduce import collate
from larv_lab.reproduce import experiments as X
from larv_lab.reproduce.anchors import ANCHORS_FILE

CORRUPTED = "clip-vit-base-patch32_robustness_corrupted"
#: the stand-in's tasks (the tiny suite's first ones; FusionBench's pool has four) and test images
#: per task and corruption (the first of the tiny suite's test split): its cells evaluate through
#: FusionBench's compat loop, which deep-copies the classifier (and its tokenizer) per task
STANDIN_TASKS = 2
STANDIN_IMAGES = 40


def _corrupt(images: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The ``k``-th corruption of uint8 images ``(n, H, W, 3)``: Gaussian noise of σ = 8·(k+1)
    grey levels (the stand-in needs distinct, deterministic splits, not ImageNet-C)."""
    rng = np.random.default_rng([seed, k])
    noisy = images.astype(np.float64) + rng.normal(0.0, 8.0 * (k + 1), size=images.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def corrupted_pool_standin(
    suite, root: Path, n_tasks: int = STANDIN_TASKS, n: int = STANDIN_IMAGES
) -> Path:
    """A config root (for :class:`~larv_lab.reproduce.registry.use_config_root`) holding stand-ins
    of FusionBench's corrupted-data model and task pools under their own names: FusionBench's
    task pool config with only its hub references replaced (the tasks' data sets, ``clip_model``)
    and no loader workers; the tiny suite's model pool (its first ``n_tasks`` tasks) with
    ``test_datasets`` on the corruption split, as FusionBench's. Each task's data set gets one
    split per corruption, made of the first ``n`` test images."""
    import datasets
    from PIL import Image

    from fusion_bench_larv.config_paths import fusion_bench_config_dir

    config, names = root / "config", suite.tasks[:n_tasks]
    tasks = []
    for task in names:
        test = suite.load_dataset(task, "test").select(range(n))
        images = np.stack([np.asarray(im.convert("RGB")) for im in test["image"]])
        folder = root / "data" / task
        for k, corruption in enumerate(X.CORRUPTIONS):
            split = datasets.Dataset.from_dict(
                {"image": [Image.fromarray(im) for im in _corrupt(images, k)],
                 "label": test["label"]},
                features=test.features,
            )  # fmt: skip
            split.to_parquet(str(folder / "data" / f"{corruption}-00000-of-00001.parquet"))
        tasks.append({"name": task, "dataset": {"name": task, "path": str(folder),
                                                "split": "${taskpool.corruption}"}})  # fmt: skip

    name = f"{CORRUPTED}.yaml"
    fb = fusion_bench_config_dir() / "taskpool" / "CLIPVisionModelTaskPool" / name
    taskpool = yaml.safe_load(fb.read_text())
    assert taskpool["type"] == "clip_vit_classification" and "_target_" not in taskpool
    taskpool.update(tasks=tasks, clip_model=str(suite.pretrained_path), num_workers=0)
    modelpool = yaml.safe_load(suite.modelpool_config_path.read_text())
    modelpool["models"] = {
        k: v for k, v in modelpool["models"].items() if k not in suite.tasks or k in names
    }
    modelpool.pop("train_datasets")
    modelpool["corruption"] = "${corruption}"
    modelpool["test_datasets"] = {
        t: {"_target_": "datasets.load_dataset", "path": str(root / "data" / t),
            "split": "${...corruption}"}
        for t in names
    }  # fmt: skip
    for group, cfg in (("taskpool", taskpool), ("modelpool", modelpool)):
        sub = "CLIPVisionModelTaskPool" if group == "taskpool" else "CLIPVisionModelPool"
        path = config / group / sub / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def corrupted_standin(tiny_clip_suite, tmp_path_factory):
    return corrupted_pool_standin(tiny_clip_suite, tmp_path_factory.mktemp("corrupted_standin"))


#: the paper's artefacts run end to end in another test file (each file names its experiments)
ELSEWHERE = {"table1": "test_reproduce_e2e.py", "fig2": "test_reproduce_e2e.py",
             "table6": "test_reproduce_e2e.py"}  # fmt: skip
#: the experiments run here on the tiny CLIP suite, and the cells they keep (one merger; the
#: variants each table needs to show a row of its own)
MAPPED = ["table2", "table3", "table4", "table5", "table8"]
MAPPED_FILTER = [
    "--suite", "clip-vit-base-patch32_TA8", "clip-vit-base-patch32_TALL14",
    "clip-vit-base-patch32_TALL20", X.GENERALIZATION.key, X.FLAN_T5.key,
    "--merger", "ties",
    "--variant", "base", "tiered", "linear", "larv-tiered-r0e0c1",
]  # fmt: skip
FIG3_FILTER = ["--suite", "*_gaussian_noise", "*_contrast", "--merger", "ties",
               "--variant", "base", "tiered"]  # fmt: skip
COMMON = ["--launcher", "inprocess", "--quiet", "-o", "fabric.accelerator=cpu", "-o", "seed=0"]


def _report_average(run_dir: Path) -> float:
    report = json.loads((run_dir / "program_report.json").read_text())
    tasks = [t for t in report if t not in ("model_info", "average")]
    return 100 * sum(report[t]["accuracy"] for t in tasks) / len(tasks)


@pytest.mark.slow
def test_every_paper_artefact_runs_end_to_end(tiny_clip_suite, corrupted_standin, tmp_path, capsys):
    from fusion_bench_larv.evaluation import per_sample
    from larv_lab.reproduce.registry import use_config_root

    out = tmp_path / "out"
    paper = {n for n, e in X.EXPERIMENTS.items() if e.paper}
    assert paper == {*MAPPED, "fig3", *ELSEWHERE}, "a paper artefact without an end-to-end run"
    for name, file in ELSEWHERE.items():
        assert f'"{name}"' in (Path(__file__).parent / file).read_text(), (name, file)

    # 1. Tables 2 (7, 9), 3, 4, 5, 8 on the tiny CLIP suite: one command, one process
    args = [*MAPPED, *MAPPED_FILTER, "--pools", f"tiny_clip:{tiny_clip_suite.root}", *COMMON]
    assert cli.main([*args, "--out", str(out)]) == 0
    # five suites mapped onto the same pools: loaded once, for the first
    reused = "ran on the pools loaded for the suite before it"
    assert capsys.readouterr().out.count(reused) == 4
    # 2. Figures 3 / 5: the harness's own route, FusionBench's corrupted-data suite, its pools
    # replaced by the stand-in under their own names
    with use_config_root(corrupted_standin):
        fig3_args = ["fig3", *FIG3_FILTER, *COMMON, "--out", str(out)]
        _, fig3_cells = cli.select(cli.build_parser().parse_args(fig3_args))
        assert cli.main(fig3_args) == 0
    assert reused not in capsys.readouterr().out  # each corruption's pools are its own
    assert len(fig3_cells) == 4 and not any(c.suite.mapped for c in fig3_cells)
    assert {c.suite.pool.parent for c in fig3_cells} == {CORRUPTED}

    art = out / "artefacts"
    for name in [*MAPPED, "fig3"]:
        for f in X.EXPERIMENTS[name].artefacts:
            assert (art / f).is_file() and (art / f).stat().st_size > 0, (name, f)

    # every table's average of a run is the average of the accuracies FusionBench reported
    runs = {p.parent for p in (out / "runs").glob("*/*/*/program_report.json")}
    assert len(runs) == 12 + 4
    checked = 0
    for path in art.glob("*.csv"):
        with open(path) as f:
            for r in csv.DictReader(f):
                run = out / "runs" / r.get("suite", "") / r.get("merger", "") / r.get("variant", "")
                if r.get("column") == "average" and run in runs and r.get("ours"):
                    assert float(r["ours"]) == pytest.approx(_report_average(run), abs=1e-3)
                    checked += 1
    assert checked >= len(runs)

    # Figures 3 / 5: per-sample results recorded on the corrupted-data pool, number for number
    # the accuracies of FusionBench's compat evaluation, on the stand-in's tasks and images
    digests = set()
    for c in fig3_cells:
        d = c.run_dir(out)
        report = json.loads((d / "program_report.json").read_text())
        (evaluation,) = per_sample.read(d / per_sample.FILE)
        assert list(evaluation) == list(tiny_clip_suite.tasks[:STANDIN_TASKS])
        for t, correct in evaluation.items():
            assert correct.size == STANDIN_IMAGES
            assert per_sample.matches_accuracy(correct, report[t]["accuracy"])
        digests.add(json.dumps(per_sample.read_digests(d / per_sample.FILE)))
    assert len(digests) == 1  # the same labels, in the same order, in every corruption
    with open(art / "fig3.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] == "larv-tiered"]
    assert len(rows) == 2 and all(r["lo"] and float(r["lo"]) <= float(r["hi"]) for r in rows)

    # Table 9: the paper's rows beside ours, in the columns of the tasks both have
    with open(art / "table9.csv") as f:
        t9 = {
            r["column"]: r
            for r in csv.DictReader(f)
            if (r["merger"], r["variant"]) == ("ties", "base")
        }
    paper = {t: float(t9[t]["paper"]) for t in t9}
    assert paper == {"mnist": 92.1, "svhn": 58.2, "eurosat": 45.1, "average": 55.6}
    assert (
        "| *paper: Fine-tuned (upper bound)* | 99.6 | 97.3 | 99.1 | 89.8 |"
        in (art / "table9.md").read_text()
    )


def _corrupted_taskpool(standin: Path, corruption: str):
    """The stand-in's task pool config in a root config that sets ``corruption``, as composed."""
    from omegaconf import OmegaConf

    path = standin / "taskpool" / "CLIPVisionModelTaskPool" / f"{CORRUPTED}.yaml"
    root = {
        "corruption": corruption,
        "fast_dev_run": False,
        "taskpool": yaml.safe_load(path.read_text()),
    }
    return OmegaConf.create(root).taskpool


@pytest.mark.slow
def test_recording_compat_pool_reports_what_fusion_bench_reports(
    tiny_clip_suite, corrupted_standin
):
    """Against FusionBench's own compat task pool (what its program builds from this config),
    on one fine-tuned tower: the same report, number for number, plus per-sample correctness."""
    import lightning as L
    from fusion_bench.compat.taskpool import load_taskpool_from_config
    from fusion_bench.utils import instantiate
    from transformers import CLIPVisionModel

    from fusion_bench_larv.evaluation import per_sample
    from fusion_bench_larv.evaluation.clip_taskpool import EVAL_TASKS

    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    theirs = load_taskpool_from_config(_corrupted_taskpool(corrupted_standin, "pixelate"))
    config = _corrupted_taskpool(corrupted_standin, "pixelate")
    config._target_ = "fusion_bench_larv.RecordingCLIPImageClassificationTaskPool"
    ours = instantiate(config, _recursive_=False)  # as FusionBench's program builds a `_target_`
    theirs._fabric = ours._fabric = fabric
    first, second = tasks = list(tiny_clip_suite.tasks[:STANDIN_TASKS])
    model = CLIPVisionModel.from_pretrained(str(tiny_clip_suite.finetuned_paths[second]))
    want = theirs.evaluate(model)
    assert ours.evaluate(model) == want
    (evaluation,) = ours.per_sample_evaluations
    assert list(evaluation) == tasks
    for task, entry in evaluation.items():
        labels = tiny_clip_suite.load_dataset(task, "test")["label"][:STANDIN_IMAGES]
        assert entry["labels_sha256"] == per_sample.labels_digest(labels)
        assert per_sample.matches_accuracy(per_sample.decode_task(entry), want[task]["accuracy"])
    # a model tagged with its own task (the fine-tuned reference row) is read on that task only
    setattr(model, EVAL_TASKS, [second])
    report = ours.evaluate(model)
    assert report[second] == want[second] and first not in report
    assert list(ours.per_sample_evaluations[1]) == [second]
    assert ours.task_names == tasks


def test_the_older_task_pool_form_takes_the_compat_recording_class():
    """FusionBench's corrupted-data pool has no `_target_`: Hydra refuses `taskpool._target_=…`,
    takes `+taskpool._target_=…`; the other recording class refuses its keys, naming this one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    from fusion_bench_larv import RecordingCLIPVisionModelTaskPool
    from fusion_bench_larv.config_paths import fusion_bench_config_dir
    from fusion_bench_larv.errors import LarvConfigError

    target = "taskpool._target_=fusion_bench_larv.RecordingCLIPImageClassificationTaskPool"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(fusion_bench_config_dir()), version_base=None):
            with pytest.raises(ConfigCompositionException):
                compose(CORRUPTED, overrides=[target])
            cfg = compose(CORRUPTED, overrides=["+" + target])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.taskpool.type == "clip_vit_classification" and cfg.taskpool._target_.endswith(
        "RecordingCLIPImageClassificationTaskPool"
    )
    old_style = {k: v for k, v in cfg.taskpool.items() if k != "_target_"}
    with pytest.raises(LarvConfigError, match=r"\+taskpool\._target_=fusion_bench_larv\."
                       "RecordingCLIPImageClassificationTaskPool"):  # fmt: skip
        RecordingCLIPVisionModelTaskPool(**old_style)


def _table9_rows() -> dict[tuple[str, str, str], dict[str, float]]:
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for a in json.loads(ANCHORS_FILE.read_text())["anchors"]:
        if a["table"] == "table9":
            rows.setdefault((a["suite"], a["merger"], a["variant"]), {})[a["task"]] = a["value"]
    return rows


def _tall20_tasks() -> list[str]:
    """The 20 tasks in FusionBench's TALL20 order (the paper's #1-#20), from the recording config."""
    from fusion_bench_larv.config_paths import larv_config_dir

    path = larv_config_dir() / "taskpool" / "CLIPVisionModelTaskPool" / "larv_recording_TALL20.yaml"
    defaults = yaml.safe_load(path.read_text())["defaults"]
    return next(v for d in defaults if isinstance(d, dict) for k, v in d.items() if "test" in k)


def test_table9_paper_rows_are_typed_from_the_paper():
    rows, tasks = _table9_rows(), _tall20_tasks()
    per_backbone = ["finetuned", "simple_average"] + [
        f"{m}/{v}"
        for m in ("ta", "iso_c", "iso_cts", "ties", "tsvm")
        for v in ("base", "larv-best")
    ]
    assert len(rows) == 3 * len(per_backbone)
    partial = ("clip-vit-large-patch14_TALL20", "iso_c", "larv-best")
    for key, row in rows.items():
        if key == partial:  # the paper prints 20 numbers for its 21 columns (the notes say which)
            assert set(tasks) - set(row) == {"pcam", "fer2013", "oxford-iiit-pet"}
            continue
        assert list(row) == [*tasks, "average"], key
        # each row's printed average is the mean of its 20 printed numbers, up to rounding
        assert abs(sum(row[t] for t in tasks) / 20 - row["average"]) <= 0.1, key
    # cells read straight off the paper text
    assert rows["clip-vit-base-patch32_TALL20", "ta", "base"]["sun397"] == 20.4
    assert rows["clip-vit-base-patch16_TALL20", "iso_c", "larv-best"]["stanford-cars"] == 17.8
    assert rows["clip-vit-large-patch14_TALL20", "tsvm", "larv-best"]["average"] == 86.4
    assert rows[partial]["dtd"] == 76.5 and rows[partial]["cifar100"] == 88.0
    assert rows[partial]["average"] == 85.4


def test_collate_shows_table9s_paper_rows_beside_ours(tmp_path):
    """Hand-written TIES cells on the 20 tasks: Table 9 shows the paper's row under each of ours."""
    tasks = _tall20_tasks()
    suite = "clip-vit-base-patch32_TALL20"
    cells = X.filter_cells(X.EXPERIMENTS["table2"].cells(), suites=[suite], mergers=["ties"],
                           variants=["base", "tiered", "continuous"])  # fmt: skip
    for i, c in enumerate(cells):
        d = c.run_dir(tmp_path)
        d.mkdir(parents=True)
        report = {t: {"accuracy": 0.5 + 0.01 * i, "loss": 0.0} for t in tasks}
        (d / "program_report.json").write_text(json.dumps(report))
    collate.collate(tmp_path, {"table2": cells})
    lines = (tmp_path / "artefacts" / "table9.md").read_text().splitlines()
    rows = _table9_rows()
    for label, variant in (("TIES", "base"), ("TIES + LARV max(tiered, continuous)†", "larv-best")):
        i = next(i for i, line in enumerate(lines) if line.startswith(f"| {label} |"))
        paper = rows[suite, "ties", variant]
        want = " | ".join(f"{paper[t]:.1f}" for t in [*tasks, "average"])
        assert lines[i + 1] == f"| ↳ *paper* | {want} |"
