"""scripts/pip_to_uv.py: uv resolves from the places pip is configured with (scripts/setup.sh)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pip_to_uv.py"


def _uv_options(text: str) -> list[str]:
    spec = importlib.util.spec_from_file_location("pip_to_uv", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.uv_options(text)


def test_pip_config_becomes_uv_options_each_value_once():
    listed = "\n".join([
        ":env:.cert='/etc/ssl/certs/ca-certificates.crt'",
        ":env:.find-links='/opt/wheels'",
        ":env:.default-timeout='180'",
        "global.constraint='/etc/xdg/pip/constraints.txt'",
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
        "global.find-links='/opt/wheels'",
    ])  # fmt: skip
    assert _uv_options(listed) == [
        "--index-strategy", "unsafe-best-match", "--native-tls",
        "--find-links", "/opt/wheels",
        "--constraint", "/etc/xdg/pip/constraints.txt",
        "--extra-index-url", "file:///opt/a/simple",
        "--extra-index-url", "file:///opt/b/simple",
    ]  # fmt: skip


def test_no_pip_config_leaves_uv_on_its_defaults_but_pips_version_rule():
    assert _uv_options("") == ["--index-strategy", "unsafe-best-match"]
