"""LARV's maths on plain state dicts and values: blocks, diagnostics, gates and their registry, settings, the veneer, input checks; no FusionBench imports."""
