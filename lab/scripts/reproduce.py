#!/usr/bin/env python
"""Thin wrapper: ``python lab/scripts/reproduce.py ARGS`` = ``python -m larv_lab.reproduce ARGS``
(one command per paper artefact and for the benchmark; see docs/reproducing.md)."""

import sys

from larv_lab.reproduce.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
