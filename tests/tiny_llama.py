"""Tiny random Llama checkpoints on disk: θ_0 and fine-tuned models (θ_0 plus Gaussian noise on
every weight), saved as Hugging Face folders (safetensors). Shared by the export's tests
(tests/test_mergekit_export.py) and the mergekit test (lab/tests/test_mergekit_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import torch

LAYERS = 4


def save_tiny_llamas(
    root: Path, tasks: int = 3, tied: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[Path, list[Path]]:
    """θ_0 in ``root/base`` and ``tasks`` fine-tuned models in ``root/ft{t}``: hidden 16, 4
    layers, vocabulary 64, the embeddings tied to the head when ``tied``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(dtype)
    base.save_pretrained(root / "base")
    theta0 = base.state_dict()
    folders = []
    for t in range(tasks):
        g = torch.Generator().manual_seed(t + 1)
        model = LlamaForCausalLM(config).to(dtype)
        state = {}
        for name, value in theta0.items():
            noise = torch.randn(value.shape, generator=g)
            state[name] = (value.float() + 0.02 * noise).to(dtype)
        model.load_state_dict(state)
        model.save_pretrained(root / f"ft{t}")
        folders.append(root / f"ft{t}")
    return root / "base", folders
