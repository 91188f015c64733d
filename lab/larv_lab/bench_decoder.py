"""What one decoder-testbed prompt costs (docs/testbeds.md, "The decoder testbed"): the greedy
answers and the fine-tuning step on SmolLM2-135M-Instruct, each the way the build ran before
``DECODER_BUILD_VERSION`` 2 and the way it runs now, interleaved in one process.

    python -m larv_lab.bench_decoder                 # 64 prompts per default task, 2 threads
    python -m larv_lab.bench_decoder --prompts 16 --steps 2 --tag smoke

- answers: ``--prompts`` prompts of each default task (a seeded draw from its source), in batches
  of 64 as they come (before: each batch padded to its longest prompt) and in batches formed by
  prompt length (now: :func:`~.testbed.decoder_build.generate_answers`); the answers must agree;
- fine-tuning: ``--steps`` forward and backward passes of 8 prompts and their answers, with the
  model's own loss over every position's logits (before) and with
  :func:`~.testbed.decoder_build.answer_token_loss` (now).

Timings are medians of ``--repeats`` alternated runs (the ratio within one run is the figure to
trust on a shared machine); run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from .testbed import decoder_build as db
    from .testbed.decoder_backbone import smollm2_dir
    from .testbed.decoder_sources import DECODER_TASKS
    from .testbed.sources import load_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="test prompts per task")
    ap.add_argument("--steps", type=int, default=4, help="fine-tuning passes per repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="decoder-cpu")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "benchmarks" / "results"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = db.DECODER_RECIPES["decoder_full"]
    folder = smollm2_dir()
    tok, model = db.load_decoder_tokenizer(folder), db.load_decoder(folder)
    rng = np.random.default_rng(0)
    prompts, answers = [], []
    for task in DECODER_TASKS:
        data = load_source(task)
        idx = rng.choice(len(data.train_inputs), args.prompts, replace=False)
        prompts += [str(p) for p in data.train_inputs[idx]]
        answers += [str(y) for y in data.train_labels[idx]]
    prompts, answers = np.array(prompts, object), np.array(answers, object)
    bs = recipe.eval_batch_size

    def answers_before() -> list[str]:  # one call per batch: each batch as it comes
        out: list[str] = []
        for sl in db.toolkit.batches(len(prompts), bs):
            out += db.generate_answers(model, tok, prompts[sl], recipe.max_prompt_tokens,
                                       recipe.max_new_tokens, bs)  # fmt: skip
        return out

    def answers_now() -> list[str]:
        return db.generate_answers(model, tok, prompts, recipe.max_prompt_tokens,
                                   recipe.max_new_tokens, bs)  # fmt: skip

    batches = [db.answer_batch(tok, prompts[i : i + 8], answers[i : i + 8], recipe, "cpu")
               for i in rng.choice(len(prompts) - 8, args.steps, replace=False)]  # fmt: skip

    def step(loss_of):
        def run():
            for b in batches:
                model.zero_grad(set_to_none=True)
                loss_of(b).backward()

        return run

    model.train()
    train_before = step(lambda b: model(**b).loss)
    train_now = step(lambda b: db.answer_token_loss(model, b))
    model.eval()
    same = answers_before() == answers_now()  # also the warm-up
    times: dict[str, list[float]] = {k: [] for k in ("answers_before", "answers_now",
                                                     "train_before", "train_now")}  # fmt: skip
    for _ in range(args.repeats):
        model.eval()
        times["answers_before"].append(_seconds(answers_before))
        times["answers_now"].append(_seconds(answers_now))
        model.train()
        times["train_before"].append(_seconds(train_before))
        times["train_now"].append(_seconds(train_now))
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(prompts)
    result = {
        "command": " ".join(
            ["python -m larv_lab.bench_decoder", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} torch threads, torch {torch.__version__}",
        "prompts": n,
        "fine_tuning_passes": len(batches),
        "answers_agree": same,
        "seconds": times,
        "per_prompt_before": med["answers_before"] / n,
        "per_prompt_now": med["answers_now"] / n,
        "answers_ratio": med["answers_now"] / med["answers_before"],
        "per_step_before": med["train_before"] / len(batches),
        "per_step_now": med["train_now"] / len(batches),
        "train_ratio": med["train_now"] / med["train_before"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# One decoder-testbed prompt's cost, SmolLM2-135M-Instruct ({result['machine']})",
        "",
        f"`{result['command'].strip()}` ({result['date']}); medians of {args.repeats} "
        "alternated runs.",
        "",
        "| work | before (s) | now (s) | now ÷ before |",
        "|---|---:|---:|---:|",
        f"| greedy answers, per prompt ({n} prompts) | {result['per_prompt_before']:.3f} | "
        f"{result['per_prompt_now']:.3f} | {result['answers_ratio']:.2f} |",
        f"| fine-tuning step, 8 prompts ({len(batches)} steps) | {result['per_step_before']:.2f} | "
        f"{result['per_step_now']:.2f} | {result['train_ratio']:.2f} |",
        "",
        f"The answers agree: {same}.",
    ]
    (args.out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
