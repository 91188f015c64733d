"""Per-task accuracies of the TA, TIES and Iso-C cells (all six variants) of a benchmark folder in
the old layout (``python -m fusion_bench_larv.benchmark``: ``runs/<merger>_<variant>/run.json``)
against one in the pipeline's layout (``python -m larv_lab.reproduce bench``:
``runs/bench/<merger>/<slug>/program_report.json``), compared for exact equality.

    python lab/results/pipeline_equivalence/compare.py OLD_DIR NEW_DIR
"""

import json
import sys
from pathlib import Path

VARIANTS = {"base": "base", "tiered": "larv-tiered", "continuous": "larv-continuous",
            "linear": "sched-linear", "tier3": "sched-tier3", "lines": "sched-lines"}  # fmt: skip


def main(old: Path, new: Path) -> int:
    compared = different = 0
    for merger in ("ta", "ties", "iso_c"):
        for ov, nv in VARIANTS.items():
            a = json.loads((old / "runs" / f"{merger}_{ov}" / "run.json").read_text())["accuracy"]
            report = json.loads(
                (new / "runs/bench" / merger / nv / "program_report.json").read_text()
            )
            b = {task: report[task]["accuracy"] for task in a}
            compared, different = compared + 1, different + (a != b)
            print(f"{merger:6} {ov:11} {'identical' if a == b else 'DIFFERENT'}  "
                  f"avg old {100 * sum(a.values()) / len(a):.4f}  new {100 * sum(b.values()) / len(b):.4f}")  # fmt: skip
    refs = json.loads((old / "references.json").read_text())
    for ref in ("pretrained", "finetuned"):
        report = json.loads((new / "runs/bench" / ref / "base/program_report.json").read_text())
        if ref == "pretrained":
            b = {task: report[task]["accuracy"] for task in refs[ref]}
        else:  # each fine-tuned model on its own task
            b = {task: report[task][task]["accuracy"] for task in refs[ref]}
        compared, different = compared + 1, different + (refs[ref] != b)
        print(f"{ref:18} {'identical' if refs[ref] == b else 'DIFFERENT'}")
    print(f"{compared} rows compared, {different} different")
    return int(different > 0)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
