"""Evaluation: the recording CLIP task pool, per-sample files, paired intervals and ``larv-compare``."""
