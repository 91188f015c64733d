"""The streaming memory benchmark (``lab/larv_lab/bench_stream.py``) on its tiny size, in this
process: the checkpoints it builds, the block size it reports, and LARV's two ways of holding θ_0
giving the same merge."""

from __future__ import annotations

import torch

from larv_lab import bench_stream


def test_tiny_pool_block_size_and_streamed_equals_copied(tmp_path):
    root = bench_stream.build(tmp_path / "tiny", "tiny", torch.bfloat16)
    assert sorted(p.name for p in root.iterdir()) == ["_pretrained_", "code", "done", "math"]
    block, total = bench_stream.block_bytes(root)
    size = bench_stream.SIZES["tiny"]
    # bfloat16: the equal layers, the embedding and the untied head (vocab × hidden each), the norm
    vocab, hidden = size["vocab_size"], size["hidden_size"]
    assert total == size["num_hidden_layers"] * block + 2 * (2 * vocab * hidden + hidden)
    streamed = bench_stream.child("larv-streamed", root, "bfloat16")
    copied = bench_stream.child("larv-copy", root, "bfloat16")
    assert streamed["theta0"].startswith("LARV: reads θ_0")
    assert copied["theta0"].startswith("LARV: keeps a copy of θ_0")
    assert streamed["scales"] == copied["scales"] and len(set(streamed["scales"])) > 1
    assert streamed["checksum"] == copied["checksum"]
    assert streamed["peak_bytes"] > 0 and copied["peak_bytes"] > 0
