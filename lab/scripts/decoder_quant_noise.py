#!/usr/bin/env python
"""How much 4-bit block rounding (GGUF Q4_1) raises r_eff of a matrix: the decoder testbed's θ_0
is SmolLM2-135M-Instruct dequantized from Q4_1 (docs/testbeds.md, "The decoder testbed").

Its full-precision weights are not at hand, so a smooth stand-in is used: the rank-64 part of
three of its (dequantized) matrices, before and after Q4_1 rounding (blocks of 32 weights along
a row, 16 levels between the block's minimum and maximum). Needs the converted model
(``larv_lab.testbed.decoder_backbone.smollm2_dir``)::

    python lab/scripts/decoder_quant_noise.py
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from fusion_bench_larv.core.diagnostics import effective_rank
from larv_lab.testbed.decoder_backbone import smollm2_dir

MATRICES = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.15.mlp.down_proj.weight",
    "model.layers.29.self_attn.o_proj.weight",
)


def q4_1(w: torch.Tensor) -> torch.Tensor:
    """Q4_1 rounding: per block b of 32 weights, q = round((w − min b) / d) with
    d = (max b − min b) / 15, back to q·d + min b."""
    b = w.reshape(-1, 32)
    lo, hi = b.min(1, keepdim=True).values, b.max(1, keepdim=True).values
    d = (hi - lo) / 15
    return (torch.round((b - lo) / d.clamp_min(1e-12)) * d + lo).reshape(w.shape)


def main() -> None:
    sd = load_file(str(smollm2_dir() / "model.safetensors"))
    for key in MATRICES:
        w = sd[key].double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        low = (u[:, :64] * s[:64]) @ vh[:64]
        before, after = effective_rank(low), effective_rank(q4_1(low))
        print(f"{key}: r_eff rank-64 part {before:.1f}, after Q4_1 {after:.1f} "
              f"({after / before - 1:+.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
