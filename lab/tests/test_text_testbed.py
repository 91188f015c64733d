"""The text testbed: its package-shipped sources, the pinned MiniLM backbone, a user's own text
source (the docs/own-data.md example at tiny size), full and LoRA builds, and a LARV merge of
them through FusionBench's own command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from larv_lab.testbed import sources as S
from larv_lab.testbed import text_backbone as TB
from larv_lab.testbed import text_build as T
from larv_lab.testbed.text_sources import TEXT_SOURCES, TEXT_TASKS
from larv_lab.testbed.tiny_clip import run_fusion_bench


def _need(*names: str) -> None:
    for name in names:
        try:
            S.locate_source(name)
        except S.SourceMissingError as exc:
            pytest.skip(f"source {name} missing (lab/scripts/install_testbed_sources.sh): {exc}")


def _need_backbone() -> None:
    try:
        TB.find_text_backbone()
    except S.SourceMissingError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_text_source_reads_distinct_texts_with_its_classes(name):
    _need(name)
    d = S.load_source(name)
    assert d.modality == "text" and TEXT_SOURCES[name].modality == "text"
    texts = list(d.train_inputs) + ([] if d.test_inputs is None else list(d.test_inputs))
    assert len(set(texts)) == len(texts)  # deduplicated, and no test text is a training text
    assert all(isinstance(t, str) and t == t.strip() and t for t in texts)
    counts = np.bincount(d.train_labels, minlength=d.num_classes)
    assert counts.min() >= 50, counts  # every class can feed a head and a test set
    assert len(d.train_inputs) + (0 if d.test_inputs is None else len(d.test_inputs)) >= 2000


def test_sotu_test_sentences_come_from_other_speeches():
    _need("sotu_era")
    d = S.load_source("sotu_era")
    # every fourth address per era is a test speech: about a quarter of the sentences
    share = len(d.test_inputs) / (len(d.test_inputs) + len(d.train_inputs))
    assert 0.15 < share < 0.35
    assert np.bincount(d.test_labels).min() > 500


def test_backbone_files_are_checked_against_their_pinned_hashes(monkeypatch):
    _need_backbone()
    folder = TB.find_text_backbone()
    assert (folder / "model.safetensors").is_file()
    monkeypatch.setitem(TB.MINILM_FILES, "config.json", "0" * 64)
    with pytest.raises(S.SourceMissingError, match="not the pinned"):
        TB.find_text_backbone()


def test_sentence_features_hand_case():
    # two tokens (1, 0) and (0, 2) and a padded token: mean (.5, 1), normalised
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    out = T.sentence_features(hidden, mask)
    expected = torch.tensor([[0.5, 1.0]]) / (0.5**2 + 1.0) ** 0.5
    torch.testing.assert_close(out, expected)


def test_a_text_source_cannot_build_an_image_testbed_nor_the_reverse(tmp_path):
    from larv_lab.testbed import build as B

    _need("sms_spam")
    with pytest.raises(ValueError, match="is a text source"):
        B._build_task(tmp_path, "sms_spam", B.RECIPES["ci"], None, "cpu", False)
    S.register_source("tiny_grey", lambda: {"train_images": np.zeros((4, 8, 8), np.uint8),
                                            "train_labels": [0, 1, 0, 1]}, overwrite=True)  # fmt: skip
    with pytest.raises(ValueError, match="needs a text source"):
        T._build_task(tmp_path, "tiny_grey", T.TEXT_RECIPES["text_ci"], None, None, "cpu", False)


def test_register_source_takes_texts_and_checks_them():
    with pytest.raises(ValueError, match="exactly one of"):
        S._user_data("x", {"train_texts": ["a"], "train_images": np.zeros((1, 2, 2), np.uint8),
                           "train_labels": [0]})  # fmt: skip
    with pytest.raises(ValueError, match="not str"):
        S._user_data("x", {"train_texts": ["a", 3], "train_labels": [0, 1]})
    with pytest.raises(ValueError, match="unknown keys"):
        S._user_data("x", {"train_texts": ["a"], "train_labels": [0], "test_images": []})
    d = S._user_data("x", {"train_texts": ["a", "b"], "train_labels": [0, 1]})
    assert d.modality == "text" and d.class_names == ("0", "1") and d.test_inputs is None


# --------------------------------------------------------------------------- builds


def _greetings():
    """The docs/own-data.md text example's loader, with hand-written data."""
    hello = ["hello there", "good morning", "hi, how are you", "greetings, friend", "hey you"]
    bye = ["goodbye now", "see you later", "farewell, friend", "bye for now", "take care"]
    texts = [f"{t} ({i})" for i in range(4) for t in hello + bye]
    return {
        "train_texts": texts,
        "train_labels": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1] * 4,
        "class_names": ["greeting", "farewell"],
    }


@pytest.fixture(scope="module")
def text_testbeds(tmp_path_factory):
    """A user text source beside a packaged one, built with full and with LoRA tuning."""
    _need_backbone()
    _need("sms_spam")
    S.register_source("greetings", _greetings, licence="CC0", overwrite=True)
    cache = tmp_path_factory.mktemp("text_testbeds")
    recipe = T.TextRecipe(
        name="mine", tasks=("greetings", "sms_spam"), max_length=16, n_train=24, n_test=12,
        head_shots=3, finetune_steps=3, finetune_batch_size=8, warmup_steps=1, finetune_lr=1e-4,
    )  # fmt: skip
    full = T.build_text_testbed(recipe, cache, num_threads=2, progress=False)
    lora = T.build_text_testbed(
        recipe.replace(name="mine_lora", tuning="lora", lora_rank=2, finetune_lr=1e-2),
        cache, num_threads=2, progress=False,
    )  # fmt: skip
    return full, lora


def test_a_registered_text_source_builds_and_resumes(text_testbeds):
    full, _ = text_testbeds
    assert full.tasks == ("greetings", "sms_spam")
    assert full.class_names["greetings"] == ("greeting", "farewell")
    texts, labels = full.test_set("greetings")
    assert len(texts) == 12 and set(labels.tolist()) <= {0, 1}
    rep = full.report["tasks"]["greetings"]
    # 40 texts: 12 for testing (30 %), 14 of the other 28 reserved for validation (the reserve's
    # cap, half the pool), 14 left to train on
    assert rep["n_train"] == 14 and 0.0 <= rep["finetuned_acc"] <= 1.0
    # a build in one run: its total is that run's time, and the summary says so
    secs = full.report["seconds"]
    assert secs["total"] == secs["this_run"] > 0
    assert full.summary().splitlines()[-1] == f"build time {secs['total']:.1f} s"
    # the head is frozen and the fine-tuned encoder moved, but not its word embeddings
    pre = dict(full.load_pretrained().named_parameters())
    ft = dict(full.load_finetuned("greetings").named_parameters())
    assert torch.equal(
        pre["embeddings.word_embeddings.weight"], ft["embeddings.word_embeddings.weight"]
    )
    assert not torch.equal(pre["encoder.layer.0.attention.self.query.weight"],
                           ft["encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    # cached: the same recipe opens the same folder without building
    again = T.build_text_testbed(full.recipe, full.root.parent, progress=False)
    assert again.root == full.root and again.report == full.report
    # the accuracy the build reported is what the testbed's evaluation gives
    acc = full.evaluate(full.load_finetuned("greetings"), "greetings")
    assert acc == pytest.approx(rep["finetuned_acc"])


def test_lora_task_vectors_are_low_rank_on_the_linears_only(text_testbeds):
    _, lora = text_testbeds
    pre = dict(lora.load_pretrained().named_parameters())
    moved = 0
    for name, p in lora.load_finetuned("sms_spam").named_parameters():
        delta = (p - pre[name]).detach()
        is_linear = name.endswith(".weight") and any(
            f".{t}.weight" in f".{name}" for t in T.LORA_TARGETS
        ) and ".layer." in name  # fmt: skip
        if not is_linear:
            assert torch.count_nonzero(delta) == 0, name
            continue
        moved += int(torch.count_nonzero(delta) > 0)
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= lora.recipe.lora_rank, name
    assert moved == 6 * 6  # q, k, v, attention output, intermediate, output in six layers


def test_fusion_bench_merges_the_text_testbed_with_larv(text_testbeds, tmp_path):
    # the built folder holds heads and test sets: the subprocess needs no registration. Over
    # WUDI: the text pools name the frozen word embeddings, and larv_wudi hands them to WUDI's
    # exclude_keys (its objective is 0/0 on a zero task vector, and its 30522 x 30522 products
    # would not fit in memory), so the merge stays finite
    full, _ = text_testbeds
    log_dir = tmp_path / "logs"
    root = str(full.root)
    report = run_fusion_bench(
        [
            "method=larv_wudi",
            "method.base_method.iter_num=2",
            "modelpool=LarvTestbed/text_ci",
            "taskpool=LarvTestbed/text_ci",
            f"modelpool.testbed_dir={root}",
            f"taskpool.testbed_dir={root}",
        ],
        cwd=tmp_path,
        log_dir=log_dir,
    )
    for task in full.tasks:
        assert 0.0 <= float(report[task]["accuracy"]) <= 1.0
        assert np.isfinite(float(report[task]["loss"]))
    layers = json.loads((log_dir / "larv_layers.json").read_text())
    assert layers["base_method"]["exclude_keys"] == ["embeddings.word_embeddings.weight"]
    # MiniLM: six encoder layers, tiered gate 2/2/2
    assert [rec["prefix"] for rec in layers["layers"]] == [f"encoder.layer.{i}." for i in range(6)]
    assert sorted(rec["s"] for rec in layers["layers"]) == [0.5, 0.5, 1.0, 1.0, 1.5, 1.5]


def test_the_task_pool_scores_every_text_as_if_it_were_alone(text_testbeds):
    # the pool batches texts longest first and cuts each batch to its longest text; the oracle
    # feeds each text alone, unpadded
    from larv_lab.testbed.pools import TestbedTaskPool

    full, _ = text_testbeds
    model = full.load_finetuned("sms_spam")
    pool = TestbedTaskPool(testbed_dir=str(full.root), batch_size=5, device="cpu")
    report = pool.evaluate(model)
    for task in full.tasks:
        texts, labels = full.test_set(task)
        clf = full.classifier(task, backbone=model)
        hits, losses = [], []
        with torch.no_grad():
            for text, label in zip(texts, labels, strict=True):
                logits = clf(**full.encode([text]))
                hits.append(int(logits.argmax(-1)) == int(label))
                losses.append(float(torch.nn.functional.cross_entropy(
                    logits, torch.tensor([int(label)]))))  # fmt: skip
        assert report[task]["accuracy"] == sum(hits) / len(hits)
        assert report[task]["loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_adamerging_runs_on_unlabelled_test_texts(text_testbeds, tmp_path):
    # the lab's AdaMerging config over a text testbed: three steps move λ, curve and λ written
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from larv_lab import config_dir
    from larv_lab.testbed.pools import TestbedModelPool

    full, _ = text_testbeds
    root = str(full.root)
    method = OmegaConf.load(config_dir() / "method" / "LarvTestbed" / "adamerging.yaml")
    doc = OmegaConf.create({"taskpool": {"recipe": "text_ci", "cache_dir": None,
                                         "testbed_dir": root}, "method": method})  # fmt: skip
    doc.method.max_steps, doc.method.batch_size = 3, 4
    alg = instantiate(doc.method, _recursive_=False)
    alg.report_dir = str(tmp_path)
    alg.run(TestbedModelPool(testbed_dir=root))
    curve = json.loads((tmp_path / "adamerging_curve.json").read_text())
    assert curve["steps"] == 3 and all(np.isfinite(curve["curve"]))
    assert curve["stopped"] == "max_steps"  # FusionBench's loop ran its steps: no early stop
    weights = torch.load(tmp_path / "merging_weights.pt")
    assert weights.shape[0] == len(full.tasks)
    assert not torch.allclose(weights, torch.full_like(weights, 0.3))


def test_held_out_validation_texts_are_neither_trained_nor_tested(text_testbeds):
    # LiNeS and guarded LARV choose on these: the texts of the training pool the build did not
    # draw (the image testbed's rule, toolkit.held_out_split)
    from larv_lab.testbed import toolkit as K
    from larv_lab.testbed.pools import TestbedTaskPool

    full, _ = text_testbeds
    pool = TestbedTaskPool(testbed_dir=str(full.root), split="validation", val_size=3)
    data = S.load_source("greetings")
    train_x, _, test_x, _, train_idx, test_idx, _ = K.split_indices(data, full.recipe)
    val_texts, val_labels = K.held_out_split(data, full.recipe, 3)
    assert len(val_texts) == 3
    assert not set(val_texts) & set(train_x[train_idx]) and not set(val_texts) & set(
        test_x[test_idx]
    )
    x, y = pool.examples("greetings")
    assert y.tolist() == val_labels.tolist()
    assert torch.equal(x["input_ids"], full.encode(val_texts)["input_ids"])
    report = pool.evaluate(full.load_pretrained())
    assert "validation" in report["average"]["split"]


def test_a_task_without_held_out_texts_is_left_out_of_validation(text_testbeds, monkeypatch):
    # a task whose training pool the build used up (n_train >= its pool) has no validation texts:
    # the validation pool scores the other tasks instead of tokenizing an empty list
    from larv_lab.testbed import pools as P

    full, _ = text_testbeds
    real = P.held_out_split

    def none_for_greetings(data, recipe, n_val):
        x, y = real(data, recipe, n_val)
        return (x[:0], y[:0]) if data.name == "greetings" else (x, y)

    monkeypatch.setattr(P, "held_out_split", none_for_greetings)
    pool = P.TestbedTaskPool(testbed_dir=str(full.root), split="validation", val_size=3)
    assert len(pool.examples("greetings")[1]) == 0
    report = pool.evaluate(full.load_pretrained())
    assert "greetings" not in report and "sms_spam" in report
