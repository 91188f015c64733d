"""The regime card of a learning-rate pilot build (``build_testbed.py --finetune-lr LR``).

Its pretrained and fine-tuned accuracies come from the build's own ``report.json`` (the build
scores both models on the test prompts, per task: what the ``pretrained`` and ``finetuned``
reference cells would score again, identical on decoder_full: docs/results.md); the base mergers'
from the base cells run on that build (``RESULTS/runs/<suite>/<merger>/base/program_report.json``).
Card and targets: :func:`larv_lab.reproduce.regime.regime_card`.

    python lab/scripts/pilot_regime_card.py BUILD_FOLDER RESULTS_FOLDER   # writes RESULTS_FOLDER/regime_pilot.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from larv_lab.reproduce.regime import card_mergers, regime_card


def pilot_card(build: Path, results: Path) -> dict:
    report = json.loads((build / "report.json").read_text())
    tasks = report["tasks"]
    pre = {t: 100 * r["pretrained_acc"] for t, r in tasks.items()}
    ft = {t: 100 * r["finetuned_acc"] for t, r in tasks.items()}
    suites = sorted(p.name for p in (results / "runs").iterdir() if p.is_dir())
    if len(suites) != 1:
        raise SystemExit(f"{results}: one pilot's cells expected, found suites {suites}")
    bases = {}
    for merger in card_mergers():
        path = results / "runs" / suites[0] / merger / "base" / "program_report.json"
        if path.is_file():
            rows = json.loads(path.read_text())
            bases[merger] = {t: 100 * rows[t]["accuracy"] for t in tasks}
    card = regime_card(pre, ft, bases)
    return {"build": build.name, "finetune_lr": report["recipe"]["finetune_lr"], **card}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="the pilot's build folder (report.json)")
    parser.add_argument("results", type=Path, help="the folder its base cells were run into")
    args = parser.parse_args(argv)
    card = pilot_card(args.build, args.results)
    (args.results / "regime_pilot.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"lr {card['finetune_lr']:g}: gain {card['finetune_gain_pp']:+.1f} pp, TA normalized "
          f"{card['ta_normalized_accuracy']:.3f}, spread {card['base_spread_pp']}, meets {card['meets']}, "
          f"missing {card['missing_mergers']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
