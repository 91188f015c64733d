"""The paper's numbers (``paper_anchors.json``) that the tables print under ours."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

ANCHORS_FILE = Path(__file__).with_name("paper_anchors.json")


@cache
def _anchor_doc() -> dict:
    return json.loads(ANCHORS_FILE.read_text())


def anchors(table: str | None) -> dict[tuple[str, str, str, str], dict]:
    """The paper's numbers of ``table`` by (suite, merger, variant, task); None: none."""
    if table is None:
        return {}
    return {
        (a["suite"], a["merger"], a["variant"], a["task"]): a
        for a in _anchor_doc()["anchors"]
        if a["table"] == table
    }


def anchor_notes(table: str) -> str:
    notes = _anchor_doc()["notes"]
    parts = [notes["general"], notes["larv-best"], notes["derived"]]
    if table in notes:
        parts.append(notes[table])
    return " ".join(parts)
