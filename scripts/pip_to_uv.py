"""Print, one per line, the `uv pip install` options that make uv resolve from the same places as
pip on this machine: pip's index URL, extra index URLs, find-links and constraint files (read
with `pip config list`, which covers pip.conf files and PIP_* variables alike), the system's
certificate store where pip is given a CA bundle (uv's --native-tls; uv otherwise trusts only its
own built-in roots), and pip's rule of taking the best version across all indexes (uv's default takes the first index
that has a package). Used by scripts/setup.sh."""

from __future__ import annotations

import shlex
import subprocess
import sys

#: pip's configuration key → uv's option (each value of a key becomes one option)
OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def uv_options(pip_config: str) -> list[str]:
    """``pip config list`` lines such as ``global.find-links='/opt/wheels'`` → uv's options, each
    value once, in the order pip lists them."""
    seen: list[tuple[str, str]] = []
    native_tls = False
    for line in pip_config.splitlines():
        key, _, value = line.partition("=")
        native_tls |= key.rpartition(".")[2] == "cert"
        option = OPTIONS.get(key.rpartition(".")[2])
        if option is None:
            continue
        for item in shlex.split(shlex.split(value)[0] if value else ""):
            if (option, item) not in seen:
                seen.append((option, item))
    out = ["--index-strategy", "unsafe-best-match", *(["--native-tls"] if native_tls else [])]
    for option, item in seen:
        out += [option, item]
    return out


if __name__ == "__main__":
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    print("\n".join(uv_options(listed)))
