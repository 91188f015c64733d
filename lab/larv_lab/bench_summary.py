"""One summary of a GPU check (``lab/benchmarks/gpu_check.sh``): the CUDA tests' outcome (pytest's
JUnit XML) and the headline figures of each cost-benchmark JSON it wrote.

    python -m larv_lab.bench_summary --junit cuda-tests.xml --out summary.md \\
        lab/benchmarks/results/cost-cuda-*.json
"""

from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET

from larv_lab.bench_cost import NAMES, cost_row_label


def junit_counts(path: str) -> dict:
    """tests / failures / errors / skipped of a pytest JUnit XML file (missing: all None)."""
    keys = ("tests", "failures", "errors", "skipped")
    if not os.path.exists(path):
        return dict.fromkeys(keys) | {"file": path, "missing": True}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["cases"] = [
        {
            "name": c.get("name"),
            "outcome": next(
                (ch.tag for ch in c if ch.tag in ("failure", "error", "skipped")), "passed"
            ),
        }
        for c in root.iter("testcase")
    ]
    return out | {"file": path}


def _s(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _p(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def summarize(jsons: list[str], junits: list[str]) -> str:
    lines = ["# GPU check: summary", ""]
    for j in junits:
        c = junit_counts(j)
        if c.get("missing"):
            lines.append(f"- CUDA tests: no result ({os.path.basename(j)} missing)")
        else:
            cases = ", ".join(f"{x['name']}: {x['outcome']}" for x in c["cases"])
            lines.append(
                f"- CUDA tests ({os.path.basename(j)}): {c['passed']} passed, {c['failures']} "
                f"failed, {c['errors']} errors, {c['skipped']} skipped ({cases})"
            )
    lines += [
        "",
        "| run | device | model | K | merger | base (s) | LARV extra cold (s) | warm (s) "
        "| extra/base | randomized warm (s) | extra/base | peak base | peak +LARV |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    spectra = []
    heads = []
    for path in jsons:
        with open(path) as f:
            res = json.load(f)
        run = os.path.basename(path).removesuffix(".json")
        heads.append(f"- {run}: device {res['device']}, torch {res['torch']}, {res['date']}")
        for kind, r in res["models"].items():
            for pr in r.get("pool_runs", []):
                for m, x in pr.get("mergers", {}).items():
                    ratio = x["ratio_warm"] if x["ratio_warm"] is not None else x["ratio_cold"]
                    lines.append(
                        f"| {run} | {res['device']} | {NAMES.get(kind, kind)} | {pr['num_tasks']} "
                        f"| {cost_row_label(m, x)} | {_s(x['base_seconds'])} "
                        f"| {_s(x['larv_extra_seconds_cold'])} | {_s(x['larv_extra_seconds_warm'])} "
                        f"| {_p(ratio)} | {_s(x.get('larv_extra_seconds_randomized_warm'))} "
                        f"| {_p(x.get('ratio_randomized_warm'))} "
                        f"| {x['peak_bytes_base'] / 2**20:,.0f} MiB "
                        f"| {x['peak_bytes_with_larv'] / 2**20:,.0f} MiB |"
                    )
            if "spectra" in r:
                x = r["spectra"]
                spectra.append(
                    f"| {run} | {NAMES.get(kind, kind)} | {x['matrices']} | {_s(x['exact_seconds'])} "
                    f"| {_s(x['randomized_seconds'])} | {x['speedup']:.1f}x "
                    f"| {_s(x.get('spearman_e'))} | {_s(x.get('spearman_e_uniform_tail'))} |"
                )
    if spectra:
        lines += [
            "",
            "| run | model | MLP matrices | exact (s) | randomized (s) | speed-up "
            "| Spearman e (top-k) | Spearman e (uniform tail) |",
            "|---|---|---|---|---|---|---|---|",
            *spectra,
        ]
    lines += ["", "Runs:", *heads]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsons", nargs="*", help="cost-benchmark JSON files")
    ap.add_argument("--junit", nargs="*", default=[], help="pytest JUnit XML files")
    ap.add_argument("--out", default=None, help="also write the summary here (markdown)")
    args = ap.parse_args(argv)
    text = summarize(sorted(args.jsons), args.junit)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
