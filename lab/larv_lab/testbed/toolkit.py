"""The testbed toolkit: what every testbed recipe's build shares.

A recipe family (the image testbed, :mod:`.build`; the text testbed, :mod:`.text_build`) says
what its backbone, head, inputs and fine-tuning are; the toolkit does the rest, the same way for
each:

- **recipes and the cache**: :class:`BaseRecipe`, :class:`RecipeFamily` (a family's recipes,
  cache key, folders and backbone loader), :class:`BuiltTestbed` (a complete build, opened),
  :func:`default_cache_dir`, :func:`cache_key`, :func:`is_cached`, :func:`locked`;
- **data**: :func:`task_seed`, :func:`split_indices`, :func:`split`, :func:`held_out_split`,
  :func:`shots`, :func:`batches`, :func:`progress_bar`;
- **heads and training**: :class:`HeadClassifier`, :func:`head_from_tensors`,
  :func:`prototype_head`, :func:`embed_all`, :func:`accuracy`, :func:`adamw`,
  :func:`train_against_head`, :func:`torch_settings`;
- **saving**: :func:`write_json`, :func:`save_tensors`, :func:`save_dir`;
- **the build**: :func:`run_build` (lock, cache, shared pieces, every task, ``report.json``,
  ``testbed.json``), :func:`build_task` (one task: split, head, fine-tuning, accuracies, saved
  files and metrics, with the recipe's own :class:`TaskSteps`), :func:`build_or_reuse` (resume
  per task), :func:`task_done`, :func:`build_seconds`, :func:`task_table`,
  :func:`build_time_line`.

Layout of every testbed folder ``<cache_dir>/<recipe.name>-<key[:16]>/``::

    testbed.json            recipe, key, fingerprints, tasks, class names (written last)
    report.json             accuracies, sizes, timings, versions
    pretrained/             the pretrained backbone (save_pretrained)
    finetuned/<task>/       the backbone fine-tuned on <task>
    heads/<task>.safetensors     the task's frozen linear head: weight (C, D), bias (C,)
    test_sets/<task>.<ext>  the task's test set (the family's format)
    tasks/<task>.json       that task's metrics (lets an interrupted build resume per task)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .sources import cache_root, file_sha256, load_source, source_fingerprint

__all__ = [
    "BaseRecipe",
    "BuiltTestbed",
    "HeadClassifier",
    "Prepared",
    "RecipeFamily",
    "TaskSteps",
    "accuracy",
    "adamw",
    "batches",
    "build_or_reuse",
    "build_seconds",
    "build_task",
    "build_time_line",
    "cache_key",
    "default_cache_dir",
    "embed_all",
    "head_from_tensors",
    "held_out_split",
    "is_cached",
    "locked",
    "progress_bar",
    "prototype_head",
    "run_build",
    "save_dir",
    "save_tensors",
    "shots",
    "split",
    "split_indices",
    "task_done",
    "task_seed",
    "task_table",
    "torch_settings",
    "train_against_head",
    "warmup_cosine",
    "write_json",
]


# --------------------------------------------------------------------------- recipes, cache


@dataclass(frozen=True)
class BaseRecipe:
    """The fields of a recipe that the toolkit reads (split, validation reserve, head shots,
    training loop, evaluation batches, seed). A family's recipe is a frozen dataclass that
    subclasses it, adds its own fields and may change defaults; ``name`` is only a label.

    ``val_reserve``: labelled inputs per task set aside for validation *before* the training
    draw (at most half the training pool), so that every task has validation examples
    (:func:`held_out_split`). ``legacy_split_tasks``: tasks that keep the split of the builds
    made before the reserve existed (validation is only what the training draw left over: none
    where it took the whole pool); the committed recipes list all their tasks, so their cache
    keys did not change. A task not listed (a registered source, a task added with
    :meth:`replace`) reserves."""

    name: str = "custom"
    tasks: tuple[str, ...] = ()
    n_train: int = 2000  # per task, capped by the train pool
    n_test: int = 1000  # per task, capped by the test pool
    test_fraction: float = 0.3  # share of a source without a split of its own kept for testing
    head_shots: int = 16  # prototype head: labelled inputs per class it is made from
    head_scale: float = 20.0  # prototype head: logit scale (CLIP's learnt temperature's role)
    finetune_steps: int = 300
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-5
    finetune_weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    eval_batch_size: int = 250
    seed: int = 0
    val_reserve: int = 200  # per task, before the training draw (capped at half the pool)
    legacy_split_tasks: tuple[str, ...] = ()  # tasks that keep the split without a reserve

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct and non-empty: {self.tasks}")
        # only the recipe's own tasks: a task added by replace(tasks=...) reserves
        legacy = set(self.legacy_split_tasks)
        object.__setattr__(self, "legacy_split_tasks", tuple(t for t in self.tasks if t in legacy))
        if isinstance(self.val_reserve, bool) or not isinstance(self.val_reserve, int):
            raise ValueError(f"val_reserve must be an integer, not {self.val_reserve!r}")
        if self.val_reserve < 0:
            raise ValueError("val_reserve must be >= 0")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("test_fraction must lie in (0, 1)")
        if min(self.n_train, self.n_test, self.finetune_batch_size, self.head_shots) < 1:
            raise ValueError("sizes must be positive")
        if self.finetune_steps < 0 or not self.head_scale > 0:
            raise ValueError("finetune_steps must be >= 0 and head_scale > 0")

    def content(self) -> dict:
        """The fields that determine the outputs (what the cache key hashes): all but
        ``name``, tuples as lists; without ``val_reserve`` and ``legacy_split_tasks`` when every
        task keeps the legacy split (the recipe's content, and key, as before the reserve)."""
        d = dataclasses.asdict(self)
        d.pop("name")
        if self.legacy_split_tasks == self.tasks:
            d.pop("val_reserve"), d.pop("legacy_split_tasks")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]):
        """The recipe a build wrote (``testbed.json``); one written before ``val_reserve``
        existed kept the legacy split for every task."""
        fields = dict(fields)
        if "val_reserve" not in fields:
            fields["legacy_split_tasks"] = fields.get("tasks", cls.tasks)
        return cls(**fields)

    def reserves(self, task: str) -> int:
        """How many inputs ``task`` sets aside for validation before the training draw (before
        the cap at half its training pool)."""
        return 0 if task in self.legacy_split_tasks else self.val_reserve

    def replace(self, **changes):
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


def default_cache_dir() -> Path:
    """``$FUSION_BENCH_LARV_CACHE`` or ``~/.cache/fusion_bench_larv/testbed``: where every
    testbed family builds by default."""
    env = os.environ.get("FUSION_BENCH_LARV_CACHE")
    return Path(env).expanduser() if env else cache_root() / "testbed"


def cache_key(recipe, fingerprints: dict, build_version: int) -> str:
    """The cache key of a build: SHA-256 of the builder version, the recipe's
    :meth:`~BaseRecipe.content` and the fingerprints of everything the build reads."""
    blob = json.dumps(
        {"build_version": build_version, "recipe": recipe.content(), "fingerprints": fingerprints},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def keep_legacy_splits(recipes: Mapping[str, Any]) -> dict[str, Any]:
    """The committed recipes with every task a legacy task: they keep the splits their results
    were built on, and their cache keys (no validation reserve, :class:`BaseRecipe`). Recipes
    made later reserve."""
    return {k: r.replace(legacy_split_tasks=r.tasks) for k, r in recipes.items()}


@dataclass(frozen=True)
class RecipeFamily:
    """A kind of testbed (image, text, ...): its recipes, what its cache key hashes, where its
    builds live and how its backbones load."""

    label: str  # how messages name one: "testbed", "text testbed"
    modality: str  # of the sources its tasks read: "image", "text"
    recipe_type: type
    recipes: Mapping[str, Any]
    build_version: int  # bump when the build's outputs change (invalidates caches)
    #: () -> hashes of the backbone files a build reads (the cache key adds the sources')
    backbone_fingerprint: Callable[[], dict]
    load_backbone: Callable[[Path], nn.Module]  # a saved backbone folder -> the model
    how_to_build: str  # completes "build it with ..."; ``{name}``: the recipe's name
    test_set_ext: str = "safetensors"  # test_sets/<task>.<ext>
    heads: bool = True  # whether a task saves heads/<task>.safetensors (a decoder has none)
    #: a saved ``tokenizer/`` folder -> the tokenizer (None: the family's inputs are not text)
    load_tokenizer: Callable[[Path], Any] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)  # extra testbed.json entries

    def names_recipe(self, recipe_or_folder) -> bool:
        """Whether the argument is a recipe of this family or the name of one."""
        return isinstance(recipe_or_folder, self.recipe_type) or (
            isinstance(recipe_or_folder, str) and recipe_or_folder in self.recipes
        )

    def get(self, recipe):
        """A recipe of this family, or the one of that name (``KeyError`` if none)."""
        if isinstance(recipe, self.recipe_type):
            return recipe
        try:
            return self.recipes[recipe]
        except KeyError:
            what = self.label.removesuffix("testbed") + "recipe"
            raise KeyError(f"unknown {what} {recipe!r}; known: {', '.join(self.recipes)}") from None

    def key(self, recipe) -> tuple[dict, str]:
        """``(fingerprints, cache key)`` of a recipe: the fingerprints are the backbone's and
        every task source's (needs them installed, to hash them)."""
        fingerprints = {
            **self.backbone_fingerprint(),
            "sources": {task: source_fingerprint(task) for task in recipe.tasks},
        }
        return fingerprints, cache_key(recipe, fingerprints, self.build_version)

    def folder(self, recipe, cache_dir: str | Path | None = None, key: str | None = None) -> Path:
        """The folder a recipe builds into: ``<cache_dir>/<name>-<key[:16]>``."""
        recipe = self.get(recipe)
        key = key if key is not None else self.key(recipe)[1]
        return Path(cache_dir or default_cache_dir()) / f"{recipe.name}-{key[:16]}"

    def built_folder(self, recipe_or_folder, cache_dir: str | Path | None = None) -> Path:
        """The folder of a complete build (one holding ``testbed.json``): a recipe's under
        ``cache_dir``, or the argument itself as a folder; else ``FileNotFoundError``."""
        if self.names_recipe(recipe_or_folder):
            recipe = self.get(recipe_or_folder)
            root = self.folder(recipe, cache_dir)
            how = self.how_to_build.format(name=recipe.name)
            missing = (
                f"{self.label} {recipe.name!r} is not built in {root.parent}; build it with {how}"
            )
        else:
            root = Path(recipe_or_folder).expanduser()
            missing = f"{root} is not a complete testbed (no testbed.json)"
        if not (root / "testbed.json").is_file():
            raise FileNotFoundError(missing)
        return root

    def load(self, recipe_or_folder, cache_dir, testbed_type, build_testbed, build=False, **kw):
        """The complete build (:meth:`built_folder`) as a ``testbed_type``
        (:meth:`BuiltTestbed.from_folder`); with ``build=True`` a recipe is built first, or
        reused (``build_testbed(recipe, cache_dir, **kw)``)."""
        if build and self.names_recipe(recipe_or_folder):
            return build_testbed(recipe_or_folder, cache_dir, **kw)
        return testbed_type.from_folder(self.built_folder(recipe_or_folder, cache_dir))


#: the folders of a built testbed whose files :meth:`BuiltTestbed.weights_digest` hashes
DIGESTED = ("pretrained", "finetuned", "heads", "test_sets")


@dataclass
class BuiltTestbed:
    """A complete testbed folder (the layout above): its recipe, cache key, tasks, class names
    and build report, with the paths and loaders every family's testbed has. A family's
    testbed subclasses it, sets :attr:`family` and adds how its test sets are read and
    evaluated."""

    family: ClassVar[RecipeFamily]

    root: Path
    recipe: Any
    key: str
    tasks: tuple[str, ...]
    class_names: dict[str, tuple[str, ...]]
    report: dict = field(repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_folder(cls, root: Path):
        """The testbed a complete build wrote in ``root`` (``testbed.json``, ``report.json``);
        ``ValueError`` if another family built it (``testbed.json`` without ``modality``: an
        image testbed)."""
        meta = json.loads((root / "testbed.json").read_text())
        modality = meta.get("modality", "image")
        if modality != cls.family.modality:
            raise ValueError(f"{root} is {_a(modality)} testbed, not {_a(cls.family.modality)} one")
        tasks = tuple(meta["tasks"])
        return cls(
            root=root,
            recipe=cls.family.recipe_type.from_dict(meta["recipe"]),
            key=meta["key"],
            tasks=tasks,
            class_names={t: tuple(meta["class_names"][t]) for t in tasks},
            report=json.loads((root / "report.json").read_text()),
        )

    @property
    def modality(self) -> str:
        return self.family.modality

    @property
    def pretrained_dir(self) -> Path:
        return self.root / "pretrained"

    @property
    def finetuned_dirs(self) -> dict[str, Path]:
        return {t: self.root / "finetuned" / t for t in self.tasks}

    @property
    def head_paths(self) -> dict[str, Path]:
        return {t: self.root / "heads" / f"{t}.safetensors" for t in self.tasks}

    @property
    def test_set_paths(self) -> dict[str, Path]:
        return {t: self.root / "test_sets" / f"{t}.{self.family.test_set_ext}" for t in self.tasks}

    def load_pretrained(self) -> nn.Module:
        return self.family.load_backbone(self.pretrained_dir)

    def weights_digest(self) -> str:
        """SHA-256 over every file of :data:`DIGESTED` (relative path and content SHA-256, in
        path order): the models the testbed hands out and the test sets they are scored on. Two
        builds of one recipe share a cache key but need not share a bit (another machine's
        numerics change the fine-tuning), and a result is comparable only with results of the
        same build."""
        h = hashlib.sha256()
        for sub in DIGESTED:
            folder = self.root / sub
            for f in sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else ():
                h.update(f"{f.relative_to(self.root)}\0{file_sha256(f)}\n".encode())
        return h.hexdigest()

    def tokenizer(self):
        """The testbed's tokenizer (``tokenizer/``, loaded once by the family's loader)."""
        if self.family.load_tokenizer is None:
            raise AttributeError(f"{self.family.label}s have no tokenizer")
        if self._tokenizer is None:
            self._tokenizer = self.family.load_tokenizer(self.root / "tokenizer")
        return self._tokenizer

    def load_finetuned(self, task: str) -> nn.Module:
        return self.family.load_backbone(self.finetuned_dirs[task])

    def head(self, task: str) -> nn.Linear:
        """The task's frozen linear head."""
        from safetensors.torch import load_file

        t = load_file(str(self.head_paths[task]))
        return head_from_tensors(t["weight"], t["bias"])


def is_cached(root: Path, key: str, force: bool) -> bool:
    """Whether ``root`` holds the complete build of ``key``; ``force`` first removes every
    build output (not the lock) so that the build starts again."""
    if force:
        for p in root.iterdir() if root.is_dir() else ():
            if p.name != ".lock":
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    meta = root / "testbed.json"
    return meta.is_file() and json.loads(meta.read_text()).get("key") == key


@contextlib.contextmanager
def locked(root: Path):
    """Hold an exclusive lock on ``root/.lock`` (created with ``root``): one build at a time."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- data


def task_seed(seed: int, *parts: str) -> int:
    """A seed for one step of one task, from the recipe's ``seed`` and names (``parts``): a
    task's draws do not depend on which other tasks are built."""
    return (seed * 1_000_003 + zlib.crc32("/".join(parts).encode())) % (2**31 - 1)


def split_indices(data, recipe):
    """The split's arrays and indices: ``(train_x, train_y, test_x, test_y, train_idx,
    test_idx, rest)``; ``rest`` = the training pool's inputs never trained on: the reserved
    validation inputs first, then those the training draw left, in draw order.

    A source with a split of its own keeps it; the others reserve a seeded
    ``recipe.test_fraction`` of their inputs for testing. Then ``recipe.reserves(task)``
    inputs of the training pool (at most half of it) are set aside for validation with a seeded
    draw of their own, so the training draw of a legacy task is what it always was;
    ``recipe.n_train`` / ``n_test`` inputs are drawn from what is left and from the test pool.
    The source's ``train_exclude`` are never trained on."""
    rng = np.random.default_rng(task_seed(recipe.seed, data.name, "split"))
    if data.test_inputs is not None:
        train_x, train_y = data.train_inputs, data.train_labels
        test_x, test_y = data.test_inputs, data.test_labels
        train_pool = np.arange(len(train_x))
        test_pool = np.arange(len(test_x))
    else:
        # no split of its own: a seeded share of the inputs is the test pool
        train_x = test_x = data.train_inputs
        train_y = test_y = data.train_labels
        order = rng.permutation(len(train_x))
        n_test_pool = int(round(recipe.test_fraction * len(order)))
        test_pool, train_pool = np.sort(order[:n_test_pool]), np.sort(order[n_test_pool:])
    if data.train_exclude is not None:
        train_pool = np.setdiff1d(train_pool, data.train_exclude)
    reserved = np.empty(0, dtype=train_pool.dtype)
    n_val = min(recipe.reserves(data.name), len(train_pool) // 2)
    if n_val > 0:
        drawn = np.random.default_rng(task_seed(recipe.seed, data.name, "validation"))
        picked = drawn.permutation(train_pool)
        reserved, train_pool = picked[:n_val], np.sort(picked[n_val:])
    order = rng.permutation(train_pool)
    train_idx, rest = order[: recipe.n_train], order[recipe.n_train :]
    test_idx = np.sort(rng.permutation(test_pool)[: recipe.n_test])
    return train_x, train_y, test_x, test_y, train_idx, test_idx, np.concatenate([reserved, rest])


def split(data, recipe) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The build's seeded train / test draw (:func:`split_indices`): ``(train_inputs,
    train_labels, test_inputs, test_labels)``, contiguous arrays."""
    train_x, train_y, test_x, test_y, train_idx, test_idx, _ = split_indices(data, recipe)
    return (
        np.ascontiguousarray(train_x[train_idx]),
        np.ascontiguousarray(train_y[train_idx]),
        np.ascontiguousarray(test_x[test_idx]),
        np.ascontiguousarray(test_y[test_idx]),
    )


def held_out_split(data, recipe, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """A labelled validation split held out from the task's training pool: up to ``n_val``
    inputs of the pool that the build did not train on (nor made the head from, which comes from
    the training draw), the reserved ones first (``recipe.val_reserve``), then those the
    training draw left, in the build's own random order; never a test input. Empty only for a
    legacy task whose training draw took the whole pool (sklearn_digits in the regime
    recipes)."""
    train_x, train_y, _, _, _, _, rest = split_indices(data, recipe)
    idx = rest[: max(0, int(n_val))]
    return np.ascontiguousarray(train_x[idx]), np.ascontiguousarray(train_y[idx])


def shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """Indices of the first ``shots`` inputs of each class in a seeded permutation (fewer when
    a class has fewer); a class without any training input is an error."""
    order = np.random.default_rng(seed).permutation(len(labels))
    picked = []
    for c in range(num_classes):
        idx = order[labels[order] == c][:shots]
        if len(idx) == 0:
            raise ValueError(f"class {c} has no training image: a prototype needs one")
        picked.append(idx)
    return np.sort(np.concatenate(picked))


def batches(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, size), [size, 2 size), ...`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def progress_bar(iterable, enabled: bool, **kwargs):
    """``iterable`` behind a tqdm bar when ``enabled``, as it is otherwise."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


# --------------------------------------------------------------------------- heads, training


class HeadClassifier(nn.Module):
    """A backbone and one task's frozen linear head: ``forward(...)`` is
    ``head(features(...))``; a family's subclass says what ``features`` pools."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head.requires_grad_(False)

    def features(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.head(self.features(*args, **kwargs))


def head_from_tensors(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``weight`` (C, D) and ``bias`` (C,)."""
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.requires_grad_(False)


def prototype_head(
    features: torch.Tensor, labels: np.ndarray, num_classes: int, recipe
) -> tuple[nn.Linear, dict]:
    """A class-prototype head, made from pretrained features without any training:

        W_c = head_scale * (p_c - p̄) / ||p_c - p̄||,  b = 0,

    with ``p_c`` the mean feature of ``head_shots`` seeded training inputs of class ``c`` and
    ``p̄`` the mean of the prototypes (centring removes the direction every feature shares,
    as in SimpleShot's CL2N). On L2-normalised features the logits are scaled cosines, CLIP's
    zero-shot form. ``features`` are those of the shot inputs only, ``labels`` their labels.
    Returns the head and its statistics."""
    y = torch.as_tensor(labels, dtype=torch.long)
    protos = torch.stack([features[y == c].mean(0) for c in range(num_classes)])
    centred = protos - protos.mean(0, keepdim=True)
    weight = recipe.head_scale * nn.functional.normalize(centred, dim=-1)
    head = head_from_tensors(weight, torch.zeros(num_classes))
    with torch.no_grad():
        logits = head(features)
        stats = {
            "head": "prototype",
            "head_shots_per_class": [int((y == c).sum()) for c in range(num_classes)],
            "head_train_acc": float((logits.argmax(-1) == y).float().mean()),
            "head_train_loss": float(nn.functional.cross_entropy(logits, y)),
        }
    return head, stats


@torch.no_grad()
def embed_all(
    model: nn.Module, embed, inputs, batch_size: int, show_progress: bool = False, desc: str = ""
) -> torch.Tensor:
    """``embed(inputs[batch])`` for every batch of ``batch_size`` inputs, concatenated as one
    float32 CPU tensor, with ``model`` (the backbone ``embed`` runs) put in eval mode."""
    model.eval()
    out = []
    chunks = list(batches(len(inputs), batch_size))
    for sl in progress_bar(chunks, show_progress, desc=desc, unit="batch"):
        out.append(embed(inputs[sl]).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def accuracy(model: nn.Module, predict, inputs, labels, batch_size: int) -> float:
    """Share of ``labels`` that ``predict(inputs[batch])`` (logits) ranks first, batch by batch,
    with ``model`` (the backbone ``predict`` runs) in eval mode, its mode restored after."""
    was_training = model.training
    model.eval()
    correct = 0
    for sl in batches(len(inputs), batch_size):
        pred = predict(inputs[sl]).argmax(-1).cpu()
        correct += int((pred == torch.as_tensor(np.asarray(labels[sl]))).sum())
    model.train(was_training)
    return correct / max(len(inputs), 1)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where this torch supports it (on CPU about 6x faster than the default
    per-tensor loop for the 22M backbone parameters)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(opt, steps: int, warm: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The fine-tuning's learning-rate schedule: step i's factor is (i + 1) / warm while
    i < warm, then ½ (1 + cos(π (i − warm) / max(steps − warm, 1)))."""

    def lr_lambda(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (i - warm) / max(steps - warm, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def train_loop(
    model: nn.Module,
    params: list,
    n: int,
    loss_of: Callable[[np.ndarray], torch.Tensor],
    recipe,
    seed: int,
    progress: bool,
    desc: str,
) -> dict:
    """The fine-tuning loop every family shares: ``recipe.finetune_steps`` AdamW steps (linear
    warm-up, cosine decay, gradient clipping) on ``params`` of ``loss_of(idx)``, the batch
    ``idx`` of the ``n`` training examples drawn without replacement from a seeded permutation
    (refreshed when it runs out). Returns the first and the final (mean of the last 20) losses."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    opt = adamw(params, recipe.finetune_lr, recipe.finetune_weight_decay)
    steps = recipe.finetune_steps
    sched = warmup_cosine(opt, steps, recipe.warmup_steps)
    bs = min(recipe.finetune_batch_size, n)
    order, pos = rng.permutation(n), 0
    losses: list[float] = []
    bar = progress_bar(range(steps), progress, desc=desc, unit="step")
    for _ in bar:
        if pos + bs > n:
            order, pos = rng.permutation(n), 0
        idx = np.sort(order[pos : pos + bs])
        pos += bs
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    tail = losses[-max(1, min(20, len(losses))) :] if losses else [float("nan")]
    return {
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(tail)),
    }


def train_against_head(
    model: nn.Module,
    params: list,
    inputs,
    labels: np.ndarray,
    recipe,
    seed: int,
    device,
    progress: bool,
    desc: str,
) -> dict:
    """:func:`train_loop` on the cross-entropy of ``model(**inputs(idx))`` against
    ``labels[idx]``."""
    y_all = torch.as_tensor(labels, dtype=torch.long)

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        return nn.functional.cross_entropy(model(**inputs(idx)), y_all[idx].to(device))

    return train_loop(model, params, len(labels), loss_of, recipe, seed, progress, desc)


@contextlib.contextmanager
def torch_settings(num_threads: int, deterministic: bool):
    """Run with ``num_threads`` torch threads and deterministic algorithms on or off (warnings
    only); both are restored after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


# --------------------------------------------------------------------------- saving


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON atomically (a temporary sibling, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict, info: dict) -> None:
    """Write a safetensors file atomically whose metadata is one key, ``"testbed"``: sorted JSON
    of ``info`` (a single key keeps the file byte-reproducible; safetensors writes several in
    hash order)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    metadata = {"testbed": json.dumps(info, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_dir(final: Path, write) -> None:
    """``write(tmp)`` into a temporary sibling folder, then rename it to ``final`` (a reader
    never sees a half-written model)."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# --------------------------------------------------------------------------- the build


class TaskSteps:
    """A family's own parts of one task's build, which :func:`build_task` runs in order.
    Subclass it and define :meth:`features` (or :meth:`make_head`), :meth:`evaluate`,
    :meth:`finetune` and :meth:`save_test_set`."""

    head_stage = "head"  # the head step's name in a task's ``seconds``
    head_info: Mapping[str, Any] = {}  # extra metadata of the saved head (e.g. its pooling)

    def __init__(self, root: Path, recipe, pretrained: nn.Module, device, progress: bool):
        self.root, self.recipe, self.pretrained = root, recipe, pretrained
        self.device, self.progress = device, progress

    def features(self, inputs, desc: str) -> torch.Tensor:
        """Features of ``inputs`` from the pretrained backbone, as the head takes them."""
        raise NotImplementedError

    def make_head(self, task: str, data, train_x, train_y, seed: int) -> tuple[nn.Linear, dict]:
        """The task's head and its statistics; by default a :func:`prototype_head` from
        ``recipe.head_shots`` seeded training inputs per class (:func:`shots`)."""
        idx = shots(train_y, data.num_classes, self.recipe.head_shots, seed)
        feats = self.features(train_x[idx], f"{task}: head")
        return prototype_head(feats, train_y[idx], data.num_classes, self.recipe)

    def evaluate(self, backbone: nn.Module, head: nn.Linear, inputs, labels) -> float:
        """Test accuracy of ``backbone`` with ``head``."""
        raise NotImplementedError

    def finetune(
        self, task: str, backbone: nn.Module, head: nn.Linear, train_x, train_y, seed: int
    ) -> tuple[nn.Module, dict]:
        """Fine-tune ``backbone`` (a fresh pretrained copy, on the device) against the frozen
        ``head``; returns the model to save (``save_pretrained``) and its statistics."""
        raise NotImplementedError

    def save_test_set(self, path: Path, task: str, inputs, labels, class_names: list) -> None:
        """Write the task's test set to ``path``."""
        raise NotImplementedError

    def source_metrics(self, data) -> dict:
        """Extra metrics of the task's source (after ``class_names``)."""
        return {}


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def build_task(family: RecipeFamily, task: str, steps: TaskSteps) -> dict:
    """Build one task into ``steps.root``: read its source, draw the seeded split
    (:func:`split`), make the head, measure the pretrained accuracy, fine-tune a fresh copy of
    the pretrained backbone, measure again, check that the head did not change, save the
    fine-tuned backbone, the head and the test set, and write (and return) the task's metrics
    to ``tasks/<task>.json``."""
    root, recipe = steps.root, steps.recipe
    t0 = time.perf_counter()
    data = load_source(task)
    if data.modality != family.modality:
        raise ValueError(
            f"task {task!r} is {_a(data.modality)} source: the {family.label} needs "
            f"{_a(family.modality)} source"
        )
    train_x, train_y, test_x, test_y = split(data, recipe)
    seed = task_seed(recipe.seed, task)
    torch.manual_seed(seed)

    t1 = time.perf_counter()
    head, head_stats = steps.make_head(task, data, train_x, train_y, seed)
    head = head.to(steps.device)
    pre_acc = steps.evaluate(steps.pretrained, head, test_x, test_y)
    head_before = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}

    t2 = time.perf_counter()
    backbone = family.load_backbone(root / "pretrained").to(steps.device)
    tuned, ft_stats = steps.finetune(task, backbone, head, train_x, train_y, seed)
    t3 = time.perf_counter()
    ft_acc = steps.evaluate(tuned, head, test_x, test_y)
    head_after = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    if any(not torch.equal(head_before[k], head_after[k]) for k in head_before):
        raise RuntimeError(f"{task}: the head changed during fine-tuning")

    # save: fine-tuned backbone atomically (tmp folder, then rename), head, test set, metrics
    save_dir(root / "finetuned" / task, tuned.cpu().save_pretrained)
    names = list(data.class_names)
    info = {"task": task, **steps.head_info, "class_names": names}
    save_tensors(root / "heads" / f"{task}.safetensors", head_after, info)
    test_path = root / "test_sets" / f"{task}.{family.test_set_ext}"
    steps.save_test_set(test_path, task, test_x, test_y, names)
    metrics = {
        "task": task,
        "num_classes": data.num_classes,
        "class_names": names,
        **steps.source_metrics(data),
        "n_train": len(train_y),
        "n_test": len(test_y),
        **head_stats,
        "pretrained_probe_acc": pre_acc,
        "finetuned_acc": ft_acc,
        "gain": ft_acc - pre_acc,
        **ft_stats,
        "seconds": {
            "load_split": t1 - t0,
            steps.head_stage: t2 - t1,
            "finetune": t3 - t2,
            "eval_save": time.perf_counter() - t3,
        },
    }
    write_json(root / "tasks" / f"{task}.json", metrics)
    return metrics


def task_done(root: Path, task: str, test_set_ext: str = "safetensors", heads: bool = True) -> bool:
    """Whether an earlier build finished ``task`` in ``root`` (metrics, backbone, head when the
    family has ``heads``, and test set all written)."""
    return (
        (root / "tasks" / f"{task}.json").is_file()
        and (root / "finetuned" / task / "model.safetensors").is_file()
        and (not heads or (root / "heads" / f"{task}.safetensors").is_file())
        and (root / "test_sets" / f"{task}.{test_set_ext}").is_file()
    )


def build_or_reuse(
    root: Path, tasks, build_task, test_set_ext: str = "safetensors", heads: bool = True
) -> dict:
    """Every task's metrics: read back for a task an interrupted build finished (marked
    ``reused``), else ``build_task(task)``. Every family resumes through this."""
    out = {}
    for task in tasks:
        if task_done(root, task, test_set_ext, heads):
            out[task] = json.loads((root / "tasks" / f"{task}.json").read_text())
            out[task]["reused"] = True
        else:
            out[task] = build_task(task)
    return out


def build_seconds(this_run: float, tasks: dict, **stages: float) -> dict:
    """A build report's times: ``this_run`` (this run's wall time), ``stages`` (named parts of
    it) and ``total`` = this_run + Σ over tasks reused from an interrupted earlier run of their
    recorded seconds, so a resumed build still reports what the whole build took."""
    reused = sum(sum(m["seconds"].values()) for m in tasks.values() if m.get("reused"))
    return {**stages, "this_run": this_run, "total": this_run + reused}


@dataclass(frozen=True)
class Prepared:
    """What a recipe's ``prepare`` step hands :func:`run_build`."""

    build_task: Callable[[str], dict]  # task -> its metrics (builds and saves it)
    report: Mapping[str, Any] = field(default_factory=dict)  # extra report.json entries
    stage: str | None = None  # the preparation's name in report.json's seconds, if reported


def run_build(
    family: RecipeFamily,
    recipe,
    cache_dir: str | Path | None,
    prepare: Callable[[Path, torch.device, bool], Prepared],
    open_testbed: Callable[[Path], Any],
    *,
    packages: Sequence[str] = ("torch", "transformers"),
    num_threads: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    force: bool = False,
):
    """Build ``recipe`` of ``family`` under ``cache_dir`` (default :func:`default_cache_dir`),
    or open the cached build if it is complete; returns ``open_testbed(folder)``.

    Under the folder's lock and :func:`torch_settings` (``num_threads``, default min(2, CPUs);
    deterministic algorithms), ``prepare(folder, device, progress)`` writes or loads what every task
    shares (the pretrained backbone, ...) and returns a :class:`Prepared`; each task not
    finished by an interrupted build is then built. ``report.json`` (device, threads,
    ``packages``' versions, times, every task's metrics) and, last, ``testbed.json`` are
    written. ``force`` rebuilds from scratch; ``progress`` prints the testbed's summary."""
    recipe = family.get(recipe)
    fingerprints, key = family.key(recipe)
    root = family.folder(recipe, cache_dir, key)
    with locked(root):
        if is_cached(root, key, force):
            testbed = open_testbed(root)
            if progress:
                print(testbed.summary() + "\n(cached: nothing was rebuilt)")
            return testbed

        t_start = time.perf_counter()
        num_threads = num_threads or max(1, min(2, os.cpu_count() or 1))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        for sub in ("finetuned", "test_sets", "tasks") + (("heads",) if family.heads else ()):
            (root / sub).mkdir(parents=True, exist_ok=True)
        with torch_settings(num_threads, deterministic=True):
            prepared = prepare(root, device, progress)
            t_prepare = time.perf_counter() - t_start
            tasks = build_or_reuse(
                root, recipe.tasks, prepared.build_task, family.test_set_ext, family.heads
            )
        stages = {prepared.stage: t_prepare} if prepared.stage else {}
        versions = {name: importlib.import_module(name).__version__ for name in packages}
        report = {
            "recipe": dataclasses.asdict(recipe),
            "key": key,
            "device": str(device),
            "num_threads": num_threads,
            "versions": versions,
            **prepared.report,
            "seconds": build_seconds(time.perf_counter() - t_start, tasks, **stages),
            "tasks": tasks,
        }
        write_json(root / "report.json", report)
        meta = {
            "build_version": family.build_version,
            **family.meta,
            "key": key,
            "recipe": dataclasses.asdict(recipe),
            "fingerprints": fingerprints,
            "tasks": list(recipe.tasks),
            "class_names": {t: tasks[t]["class_names"] for t in recipe.tasks},
        }
        write_json(root / "testbed.json", meta)
        testbed = open_testbed(root)
    if progress:
        print(testbed.summary())
    return testbed


def task_table(tasks: dict, task_width: int, pre_label: str, pre_width: int) -> list[str]:
    """A summary's table of tasks: a header, then one row per task of a build report
    (classes, sizes, pretrained and fine-tuned accuracies, gain, seconds, ``(cached)``)."""
    lines = [
        f"{'task':<{task_width}}{'classes':>8}{'train':>7}{'test':>6}{pre_label:>{pre_width}}"
        f"{'fine-tuned':>12}{'gain':>8}{'seconds':>9}"
    ]
    for t, m in tasks.items():
        lines.append(
            f"{t:<{task_width}}{m['num_classes']:>8}{m['n_train']:>7}{m['n_test']:>6}"
            f"{m['pretrained_probe_acc']:>{pre_width}.4f}{m['finetuned_acc']:>12.4f}"
            f"{m['gain']:>+8.4f}{sum(m['seconds'].values()):>9.1f}"
            + ("  (cached)" if m.get("reused") else "")
        )
    return lines


def build_time_line(seconds: dict) -> str:
    """A summary's last line; reports written before ``this_run`` existed have only ``total``."""
    if "this_run" in seconds and seconds["this_run"] != seconds["total"]:
        return (
            f"build time {seconds['total']:.1f} s (this run {seconds['this_run']:.1f} s, resumed)"
        )
    return f"build time {seconds['total']:.1f} s"
