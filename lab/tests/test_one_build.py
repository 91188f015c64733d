"""Results of two builds of one testbed are never compared: the build's digest
(``BuiltTestbed.weights_digest``) goes into each cell's ``cell.json`` and the collator refuses a
suite whose cells record different ones (``results.check_one_build``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from larv_lab.reproduce.results import Run, check_one_build
from larv_lab.testbed.toolkit import BuiltTestbed


def _testbed(root):
    return BuiltTestbed(root=root, recipe=None, key="k", tasks=(), class_names={}, report={})


def test_weights_digest_sees_one_changed_byte_and_nothing_else(tmp_path):
    for sub, name, data in (("pretrained", "model.safetensors", b"\x00\x01"),
                            ("finetuned/a", "model.safetensors", b"\x02\x03"),
                            ("test_sets", "a.safetensors", b"\x04")):  # fmt: skip
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / name).write_bytes(data)
    first = _testbed(tmp_path).weights_digest()
    (tmp_path / "report.json").write_text("{}")  # outside the hashed folders: no change
    assert _testbed(tmp_path).weights_digest() == first
    (tmp_path / "finetuned" / "a" / "model.safetensors").write_bytes(b"\x02\x07")
    changed = _testbed(tmp_path).weights_digest()
    assert changed != first
    # a file moved to another task is another build too (the path is hashed with the content)
    (tmp_path / "finetuned" / "a").rename(tmp_path / "finetuned" / "b")
    assert _testbed(tmp_path).weights_digest() not in (first, changed)


def _run(suite, name, models):
    cell = SimpleNamespace(suite=SimpleNamespace(key=suite), rel_dir=f"{suite}/{name}")
    return Run(cell, {"t": 50.0}, models=models)


def test_one_suite_with_two_builds_is_refused():
    a, b = (
        {"testbed": "full-x", "weights_sha256": "aa"},
        {"testbed": "full-x", "weights_sha256": "bb"},
    )
    check_one_build([_run("s", "ta/base", a), _run("s", "ta/larv", a), _run("s", "old", None)])
    check_one_build([_run("s", "ta/base", a), _run("t", "ta/base", b)])  # two suites: fine
    with pytest.raises(ValueError, match="different builds"):
        check_one_build([_run("s", "ta/base", a), _run("s", "ta/larv", b)])
