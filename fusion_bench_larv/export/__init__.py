"""LARV outside FusionBench: ``larv-mergekit`` writes a mergekit config that applies LARV's
per-block scales (:mod:`.mergekit`; the maths is :mod:`fusion_bench_larv.core.mergekit`)."""
