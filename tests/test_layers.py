"""Layer grouping on state-dict keys of real architectures built from configs (no downloads)."""

from __future__ import annotations

import pytest
from open_clip.transformer import VisionTransformer
from transformers import CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

from fusion_bench_larv.core.layers import KNOWN_LAYER_PATTERNS, LayerGroupingError, group_layers


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


# -- more architectures, built from configs (nothing downloaded) -------------------------------
def _layer_of(g, name):
    for i, m in enumerate(g.members):
        if name in m:
            return i
    return g.outside[name]


def test_hf_clip_every_block_parameter_and_positions(hf_clip_keys):
    g = group_layers(hf_clip_keys)
    for i, m in enumerate(g.members):
        assert set(m) == {
            k for k in hf_clip_keys if k.startswith(f"vision_model.encoder.layers.{i}.")
        }
    for name in g.outside:
        assert not name.startswith("vision_model.encoder.layers.")
        pos = g.outside_position[name]
        assert pos == ("after" if "post_layernorm" in name else "before")
    assert g.num_layers == 4


def test_open_clip_full_model_visual_outputs_follow_the_visual_tower():
    import open_clip

    m = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": 3, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
        text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 2},
    )
    keys = list(m.state_dict())
    g = group_layers(keys)
    assert g.pattern == KNOWN_LAYER_PATTERNS["open_clip"]
    assert g.prefixes[:3] == [f"visual.transformer.resblocks.{i}." for i in range(3)]
    # `visual.proj` is listed before everything, `visual.ln_post` after the text tower's blocks:
    # both close the *visual* tower, not the text one
    assert g.outside["visual.proj"] == 2 and g.outside_position["visual.proj"] == "after"
    assert g.outside["visual.ln_post.weight"] == 2
    assert g.outside["visual.conv1.weight"] == 0 and g.outside["visual.class_embedding"] == 0
    assert g.outside["text_projection"] == g.num_layers - 1


def test_open_clip_fusionbench_image_encoder_layout():
    # FusionBench's open_clip ImageEncoder wraps CLIP as `model.` and drops the text transformer
    import open_clip

    m = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
        text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1},
    )
    del m.transformer
    keys = ["model." + k for k in m.state_dict()]
    g = group_layers(keys)
    assert g.prefixes == [f"model.visual.transformer.resblocks.{i}." for i in range(2)]
    assert g.outside["model.visual.proj"] == 1 and g.outside["model.visual.ln_post.bias"] == 1
    assert g.outside["model.visual.conv1.weight"] == 0


def test_t5_block_contents_and_positions():
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=64,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=3,
            num_decoder_layers=2,
            num_heads=2,
        )
    )
    keys = list(t5.state_dict())
    g = group_layers(keys)
    assert g.num_layers == 5
    # nested `layer.{j}` are inside blocks: the encoder block holds self-attention and FF,
    # the decoder block self-, cross-attention and FF
    assert any(".layer.1." in k for k in g.members[0])
    assert any(".layer.2." in k for k in g.members[3])
    assert g.outside_position["encoder.final_layer_norm.weight"] == "after"
    assert g.outside_position["decoder.embed_tokens.weight"] == "before"
    assert g.outside["encoder.embed_tokens.weight"] == 0


def test_timm_vit_patch_embedding_is_before_the_blocks():
    import timm

    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=3
    )
    keys = list(m.state_dict())
    g = group_layers(keys)
    _check_blocks(g, keys, [f"blocks.{i}." for i in range(3)])
    # `patch_embed.proj` is a submodule listed before the blocks: the stem, not an output head
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert g.outside[k] == 0 and g.outside_position[k] == "before"
    for k in ("norm.weight", "head.bias"):
        assert g.outside[k] == 2 and g.outside_position[k] == "after"


def test_encoder_decoder_with_layers_containers():
    # BART: `encoder.layers.{i}` then `decoder.layers.{i}`; the CLIP pattern alone would miss
    # the decoder, so detection takes the pattern that matches the most names
    from transformers import BartConfig, BartModel

    cfg = BartConfig(
        vocab_size=50, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
    )  # fmt: skip
    keys = list(BartModel(cfg).state_dict())
    g = group_layers(keys)
    prefixes = [f"encoder.layers.{i}." for i in range(2)] + [
        f"decoder.layers.{i}." for i in range(3)
    ]
    _check_blocks(g, keys, prefixes)
    assert g.outside["shared.weight"] == 0
    assert g.outside["decoder.embed_tokens.weight"] == 2


def test_gpt2_and_bert_generic_containers():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    gpt = list(
        GPT2Model(
            GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50, n_positions=16)
        ).state_dict()
    )
    g = group_layers(gpt)
    _check_blocks(g, gpt, [f"h.{i}." for i in range(3)])
    assert g.outside["wte.weight"] == 0 and g.outside["ln_f.weight"] == 2
    bert_cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    bert = list(BertModel(bert_cfg).state_dict())
    g = group_layers(bert)
    _check_blocks(g, bert, [f"encoder.layer.{i}." for i in range(2)])
    assert g.outside["embeddings.word_embeddings.weight"] == 0
    assert g.outside["pooler.dense.weight"] == 1


@pytest.mark.parametrize("container", ["layers", "blocks", "h", "layer"])
def test_generic_top_level_containers(container):
    keys = [f"{container}.{i}.{p}" for i in range(4) for p in ("attn.weight", "mlp.bias")]
    g = group_layers(["tok.weight", *keys, "lm_head.weight"])
    assert g.prefixes == [f"{container}.{i}." for i in range(4)]
    assert g.members[2] == [f"{container}.2.attn.weight", f"{container}.2.mlp.bias"]
    assert g.outside == {"tok.weight": 0, "lm_head.weight": 3}


def test_generic_nested_indices_are_not_blocks():
    # `blocks.{i}.layers.{j}`: the outermost index is the block
    keys = [f"model.blocks.{i}.layers.{j}.w" for i in range(3) for j in range(2)]
    g = group_layers(keys)
    assert g.prefixes == [f"model.blocks.{i}." for i in range(3)]
    assert all(len(m) == 2 for m in g.members)


def test_user_pattern_named_group_wins_over_first_group():
    keys = ["enc.0.w", "enc.1.w", "dec.0.w", "dec.1.w", "dec.2.w", "out.w"]
    g = group_layers(keys, r"^(enc|dec)\.(?P<idx>\d+)\.")
    assert g.prefixes == ["enc.0.", "enc.1.", "dec.0.", "dec.1.", "dec.2."]
    assert g.outside == {"out.w": 4}
    # the same with only positional groups: the first one is taken for the index, and the error
    # says it did not capture a number
    with pytest.raises(LayerGroupingError, match="captured 'enc'"):
        group_layers(keys, r"^(enc|dec)\.(\d+)\.")


def test_user_pattern_overrides_detection():
    # auto-detection would take `layers.{i}`; the user groups by `stage_{i}` instead
    keys = [f"stage_{s}.layers.{i}.w" for s in range(2) for i in range(3)]
    assert group_layers(keys).num_layers == 6
    g = group_layers(keys, r"^stage_(?P<idx>\d+)\.")
    assert g.prefixes == ["stage_0.", "stage_1."] and all(len(m) == 3 for m in g.members)


def test_model_without_blocks_names_the_patterns_tried():
    for keys in ([], ["conv1.weight", "bn1.bias", "fc.weight"], ["layers.weight"]):
        with pytest.raises(LayerGroupingError) as err:
            group_layers(keys)
        msg = str(err.value)
        assert all(name in msg and pattern in msg for name, pattern in KNOWN_LAYER_PATTERNS.items())
