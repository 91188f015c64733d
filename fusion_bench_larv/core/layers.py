"""Layer grouping: which parameters form transformer block ℓ = 1..L (docs/method.md, "Layers").

Plain strings and regexes only (no torch, no FusionBench), so it can be tested on key lists.

A *layer pattern* is a regex whose named group ``idx`` (or, failing that, its first group)
captures the block index. The text of the key before that index is the *stack*: one model can
have several stacks (T5: ``encoder.block.`` then ``decoder.block.``), which are laid end to end
on one depth axis in the order they first appear in the state dict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import LayerGroupingError

# The pattern matching the most keys is used for the whole model (ties: the earlier one).
# Specific architectures come first so that nested indices (T5's `block.0.layer.1.`) are not
# mistaken for blocks by the generic pattern.
KNOWN_LAYER_PATTERNS: dict[str, str] = {
    "t5": r"^(?:.*\.)?(?:encoder|decoder)\.block\.(?P<idx>\d+)\.",
    "hf_clip": r"^(?:.*\.)?encoder\.layers\.(?P<idx>\d+)\.",  # with and without `vision_model.`
    "open_clip": r"^(?:.*\.)?transformer\.resblocks\.(?P<idx>\d+)\.",
    "generic": r"^(?:.*?\.)?(?:layers|blocks|h|layer|block)\.(?P<idx>\d+)\.",
}

# Names of parameters outside the blocks that sit *after* them in the forward pass even when the
# state dict lists them first (open_clip's `visual.proj` is a direct parameter, so it precedes the
# submodules). Used by the `nearest` policy only.
POST_BLOCK_NAME = re.compile(
    r"(?:^|\.)(?:ln_post|post_layernorm|final_layer_norm|ln_f|fc_norm|norm|head|lm_head|proj|"
    r"text_projection|visual_projection|classifier)(?:\.|$)"
)


@dataclass
class LayerGroups:
    """Result of grouping a model's parameter names into depth-ordered layers."""

    pattern: str
    prefixes: list[
        str
    ]  # layer ℓ-1 -> its parameter-name prefix, e.g. "vision_model.encoder.layers.3."
    members: list[list[str]]  # layer ℓ-1 -> parameter names in that block
    outside: dict[str, int]  # parameter outside blocks -> index (0-based) of the layer it follows
    outside_position: dict[str, str] = field(default_factory=dict)  # name -> "before" | "after"

    @property
    def num_layers(self) -> int:
        return len(self.prefixes)


def _compile(pattern: str) -> re.Pattern:
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise LayerGroupingError(f"layer_pattern {pattern!r} is not a valid regex: {err}") from err
    if "idx" not in rx.groupindex and rx.groups < 1:
        raise LayerGroupingError(
            f"layer_pattern {pattern!r} must capture the block index, as a named group "
            "(?P<idx>\\d+) or as its first group, e.g. r'^model\\.layers\\.(\\d+)\\.'"
        )
    return rx


def _index_span(m: re.Match) -> tuple[int, int]:
    group = "idx" if "idx" in m.re.groupindex else 1
    return m.span(group)


def detect_layer_pattern(names: Iterable[str]) -> str | None:
    """The known pattern that matches the most names; ties go to the earlier (more specific) one.
    Counting, not first-match: `hf_clip` also matches a BART/Whisper encoder but not its
    `decoder.layers.{i}`, which the generic pattern covers as well."""
    names = list(names)
    best, best_count = None, 0
    for pattern in KNOWN_LAYER_PATTERNS.values():
        rx = re.compile(pattern)
        count = sum(1 for n in names if rx.search(n))
        if count > best_count:
            best, best_count = pattern, count
    return best


def _owner(name: str, stacks: Sequence[str]) -> str | None:
    """The stack sharing the most leading name components with ``name`` (at least one); None
    when no stack shares any, or two share equally many (e.g. a top-level `lm_head`)."""
    parts = name.split(".")

    def shared(stack: str) -> int:
        n = 0
        for a, b in zip(parts, stack.split("."), strict=False):
            if a != b:
                break
            n += 1
        return n

    counts = sorted(((shared(s), s) for s in stacks), key=lambda t: -t[0])
    if not counts or counts[0][0] == 0 or (len(counts) > 1 and counts[1][0] == counts[0][0]):
        return None
    return counts[0][1]


def group_layers(names: Sequence[str], layer_pattern: str | None = None) -> LayerGroups:
    """Group parameter names (in state-dict order) into transformer blocks.

    ``layer_pattern=None`` auto-detects among :data:`KNOWN_LAYER_PATTERNS`.
    """
    names = list(names)
    if layer_pattern is None:
        layer_pattern = detect_layer_pattern(names)
        if layer_pattern is None:
            tried = "\n  ".join(f"{k}: {v}" for k, v in KNOWN_LAYER_PATTERNS.items())
            raise LayerGroupingError(
                "LARV found no transformer block in the model. Patterns tried:\n  "
                f"{tried}\nPass your own with `layer_pattern=<regex>` (method.layer_pattern=... on "
                "the command line); its group (?P<idx>\\d+) or first group must capture the block "
                "index."
            )
    rx = _compile(layer_pattern)

    stacks: list[str] = []  # stack prefixes in order of first appearance
    blocks: dict[tuple[str, int], list[str]] = {}
    block_prefix: dict[tuple[str, int], str] = {}
    key_of: dict[str, tuple[str, int]] = {}
    for name in names:
        m = rx.search(name)
        if m is None:
            continue
        start, end = _index_span(m)
        if not name[start:end].isdigit():  # a user pattern whose index group is not the number
            raise LayerGroupingError(
                f"layer_pattern {layer_pattern!r} must capture the block index, but on {name!r} "
                f"its index group captured {name[start:end]!r}; use (?P<idx>\\d+)"
            )
        stack, idx = name[:start], int(name[start:end])
        if stack not in stacks:
            stacks.append(stack)
        key = (stack, idx)
        blocks.setdefault(key, []).append(name)
        block_prefix[key] = name[: m.end()]
        key_of[name] = key

    if not blocks:
        raise LayerGroupingError(
            f"layer_pattern {layer_pattern!r} matched no parameter name (first names: {names[:5]})"
        )
    ordered = sorted(blocks, key=lambda k: (stacks.index(k[0]), k[1]))
    layer_of_key = {k: i for i, k in enumerate(ordered)}
    last_layer_of_stack = {s: max(layer_of_key[k] for k in ordered if k[0] == s) for s in stacks}

    # Outside-block parameters follow the block nearest to them in the forward pass. A parameter
    # belongs to the stack whose prefix shares the most leading name components with it (T5
    # `decoder.embed_tokens` -> `decoder.block.`, open_clip `visual.proj` ->
    # `visual.transformer.resblocks.` rather than the text tower's `transformer.resblocks.`);
    # output norms/projections (POST_BLOCK_NAME) sit after their stack's last block.
    first_pos = {}
    for pos, name in enumerate(names):
        if name in key_of:
            first_pos.setdefault(key_of[name][0], pos)
    first_layer_of_stack = {s: min(layer_of_key[k] for k in ordered if k[0] == s) for s in stacks}
    owner_of = {name: _owner(name, stacks) for name in names if name not in key_of}

    outside: dict[str, int] = {}
    position: dict[str, str] = {}
    last_seen: int | None = None  # deepest layer seen so far in state-dict order
    for pos, name in enumerate(names):
        if name in key_of:
            li = layer_of_key[key_of[name]]
            last_seen = li if last_seen is None else max(last_seen, li)
            continue
        owner = owner_of[name]
        before = pos < first_pos[owner] if owner is not None else last_seen is None
        post = POST_BLOCK_NAME.search(name)
        # Listed before the blocks, only a direct parameter (open_clip's `proj`, which precedes
        # the submodules in the state dict) is taken for an output projection: a submodule there
        # (timm's `patch_embed.proj`, Swin's `embeddings.norm`) really runs first.
        if post and (not before or post.end() == len(name)):
            li = last_layer_of_stack[owner] if owner is not None else len(ordered) - 1
            outside[name], position[name] = li, "after"
        elif owner is not None:
            li = first_layer_of_stack[owner] if before else last_layer_of_stack[owner]
            outside[name], position[name] = li, "before" if before else "after"
        elif before:
            outside[name], position[name] = 0, "before"
        else:
            outside[name], position[name] = last_seen, "after"
    return LayerGroups(
        pattern=layer_pattern,
        prefixes=[block_prefix[k] for k in ordered],
        members=[blocks[k] for k in ordered],
        outside=outside,
        outside_position=position,
    )
