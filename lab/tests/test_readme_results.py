"""README's "Main results" questions table against the committed ``bench.md`` it is copied from:
a value written in two places must not drift (re-collating changes bench.md; this test then
says which README cell is stale)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: README column header -> (results folder, its suites, seed 0 then seed 1)
COLUMNS = {
    "images: DINOv2 ViT-S, full fine-tuning": (
        "lab/results/testbed_regime",
        ("testbed:full", "testbed:full_seed1"),
    ),
    "text: MiniLM-L6, full fine-tuning": (
        "lab/results/text_regime",
        ("testbed:text_full", "testbed:text_full_seed1"),
    ),
    "text: MiniLM-L6, LoRA": (
        "lab/results/text_regime",
        ("testbed:text_lora", "testbed:text_lora_seed1"),
    ),
}


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_table(lines: list[str], first_header: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first table whose header starts with ``| first_header |``: its column headers (after
    the first) and ``{row label: cells}``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = cells(lines[start])[1:]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        label, *values = cells(line)
        rows[label] = values
    return header, rows


def test_the_questions_table_in_readme_matches_each_bench_md():
    readme = (ROOT / "README.md").read_text().splitlines()
    main = readme[next(i for i, line in enumerate(readme) if line.startswith("## Main results")) :]
    header, rows = markdown_table(main, "Question")
    assert header and set(header) <= set(COLUMNS), header
    assert len(rows) == 4
    for col, name in enumerate(header):
        folder, suites = COLUMNS[name]
        bench = (ROOT / folder / "artefacts" / "bench.md").read_text().splitlines()
        block = bench[
            next(i for i, line in enumerate(bench) if "The questions, per suite" in line) :
        ]
        bench_header, bench_rows = markdown_table(block, "Question")
        for label, values in rows.items():
            expected = " · ".join(bench_rows[label][bench_header.index(s)] for s in suites)
            assert values[col] == expected, (
                f"README {name!r}, {label!r}: {values[col]!r} != {expected!r}"
            )
