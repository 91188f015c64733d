"""Layer grouping on state-dict keys of real architectures built from configs (no downloads)."""

from __future__ import annotations

import pytest
from open_clip.transformer import VisionTransformer
from transformers import CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

from fusion_bench_larv.layers import KNOWN_LAYER_PATTERNS, LayerGroupingError, group_layers


@pytest.fixture(scope="module")
def hf_clip_keys():
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    return list(CLIPVisionModel(cfg).state_dict())


def _check_blocks(groups, keys, prefixes):
    assert groups.prefixes == prefixes
    members = [k for m in groups.members for k in m]
    assert sorted(members + list(groups.outside)) == sorted(keys)  # every key exactly once
    for prefix, m in zip(groups.prefixes, groups.members, strict=True):
        assert m and all(k.startswith(prefix) for k in m)


def test_hf_clip_with_vision_model_prefix(hf_clip_keys):
    g = group_layers(hf_clip_keys)
    _check_blocks(g, hf_clip_keys, [f"vision_model.encoder.layers.{i}." for i in range(4)])
    assert g.outside["vision_model.embeddings.patch_embedding.weight"] == 0
    assert g.outside["vision_model.pre_layrnorm.weight"] == 0
    assert g.outside["vision_model.post_layernorm.bias"] == 3
    assert len(g.members[0]) == 16  # q, k, v, out, fc1, fc2 (+ biases), two layer norms


def test_hf_clip_transformers5_layout(hf_clip_keys):
    keys = [k.removeprefix("vision_model.") for k in hf_clip_keys]
    g = group_layers(keys)
    _check_blocks(g, keys, [f"encoder.layers.{i}." for i in range(4)])
    assert g.outside["post_layernorm.weight"] == 3 and g.outside["embeddings.class_embedding"] == 0


def test_depth_order_is_numeric_not_lexicographic():
    keys = [f"model.layers.{i}.w" for i in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)]
    g = group_layers(keys)
    assert g.prefixes == [f"model.layers.{i}." for i in range(12)]


def test_open_clip_vit():
    m = VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp_ratio=2.0, output_dim=16
    )
    keys = list(m.state_dict())
    g = group_layers(keys)
    assert g.pattern == KNOWN_LAYER_PATTERNS["open_clip"]
    _check_blocks(g, keys, [f"transformer.resblocks.{i}." for i in range(3)])
    # `proj` is listed first (a direct parameter) but is the output projection
    assert g.outside["proj"] == 2 and g.outside["ln_post.weight"] == 2
    assert g.outside["conv1.weight"] == 0 and g.outside["class_embedding"] == 0
    # with open_clip's full-model prefix
    g2 = group_layers(["visual." + k for k in keys])
    assert g2.prefixes == [f"visual.transformer.resblocks.{i}." for i in range(3)]


def test_t5_encoder_then_decoder():
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=64,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=2,
            num_decoder_layers=3,
            num_heads=2,
        )
    )
    keys = list(t5.state_dict())
    g = group_layers(keys)
    prefixes = [f"encoder.block.{i}." for i in range(2)] + [f"decoder.block.{i}." for i in range(3)]
    _check_blocks(g, keys, prefixes)  # T5's nested `layer.{j}` are not blocks
    assert g.outside["shared.weight"] == 0
    assert g.outside["encoder.final_layer_norm.weight"] == 1  # last encoder block
    assert g.outside["decoder.embed_tokens.weight"] == 2  # first decoder block
    assert g.outside["decoder.final_layer_norm.weight"] == 4
    assert g.outside["lm_head.weight"] == 4


@pytest.mark.parametrize("container", ["layers", "blocks", "h", "layer"])
def test_generic_patterns(container):
    keys = (
        ["embed.weight"] + [f"model.{container}.{i}.fc.weight" for i in range(3)] + ["norm.weight"]
    )
    g = group_layers(keys)
    assert g.prefixes == [f"model.{container}.{i}." for i in range(3)]
    assert g.outside == {"embed.weight": 0, "norm.weight": 2}


def test_user_pattern_named_and_first_group():
    keys = ["stem.w", "stage_0.w", "stage_1.w", "stage_2.w", "head.w"]
    for pattern in (r"^stage_(?P<idx>\d+)\.", r"^stage_(\d+)\."):
        g = group_layers(keys, pattern)
        assert g.prefixes == ["stage_0.", "stage_1.", "stage_2."]
        assert g.outside == {"stem.w": 0, "head.w": 2}


def test_no_block_found_lists_patterns():
    with pytest.raises(LayerGroupingError) as err:
        group_layers(["conv.weight", "fc.weight"])
    for pattern in KNOWN_LAYER_PATTERNS.values():
        assert pattern in str(err.value)
    assert "layer_pattern" in str(err.value)


def test_bad_user_patterns():
    with pytest.raises(LayerGroupingError, match="matched no parameter"):
        group_layers(["a.0.w"], r"^blocks\.(\d+)\.")
    with pytest.raises(LayerGroupingError, match="capture the block index"):
        group_layers(["a.0.w"], r"^a\.\d+\.")
    with pytest.raises(LayerGroupingError, match="not a valid regex"):
        group_layers(["a.0.w"], r"^a\.(\d+")
