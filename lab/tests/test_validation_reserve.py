"""The recipes' validation reserve (larv_lab.testbed.toolkit.BaseRecipe): every task of a new
recipe, or a registered source, gets validation examples set aside before the training draw;
the committed recipes keep their splits and cache keys. On a toy source, no installed data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from larv_lab.testbed import build as B
from larv_lab.testbed import text_build as T
from larv_lab.testbed import toolkit as K

#: cache_key(recipe, {}, 0)[:16] of every committed recipe, computed before the reserve existed
#: (the key also hashes the sources' and backbone's fingerprints, which the reserve leaves alone)
COMMITTED_KEYS = {
    "full": "d1f60ebc5f0e1faf",
    "full_seed1": "87a7ca0bc9438252",
    "quick": "5aed61d356470c78",
    "probe5": "47b03a44944718fc",
    "ci": "a3f2d938d16d0da0",
    "text_full": "0d7b5bed590cd4af",
    "text_full_seed1": "a1e11f8e5f17a189",
    "text_lora": "cd273df53d4838dc",
    "text_lora_seed1": "28163fdbbaf644e9",
    "text_quick": "a31cb8fe4c0ca3e5",
    "text_ci": "a37a49c98a66f5ab",
}


class Toy:
    """What split_indices reads of a source: 100 inputs, no split of its own."""

    name = "toy"
    train_inputs = np.arange(100)
    train_labels = np.arange(100) % 2
    test_inputs = test_labels = train_exclude = None


def test_committed_recipes_keep_their_cache_keys():
    recipes = {**B.RECIPES, **T.TEXT_RECIPES}
    assert {n: K.cache_key(r, {}, 0)[:16] for n, r in recipes.items()} == COMMITTED_KEYS
    assert all(r.legacy_split_tasks == r.tasks for r in recipes.values())


def test_new_recipes_and_registered_sources_reserve_by_default():
    assert B.Recipe(name="mine").reserves("mnist") == 200
    assert T.TextRecipe(name="mine").reserves("sms_spam") == 200
    # a committed recipe's settings over new tasks: the new tasks reserve, its own keep theirs
    mixed = B.RECIPES["full"].replace(name="mine", tasks=("mnist", "my_source"))
    assert mixed.legacy_split_tasks == ("mnist",)
    assert (mixed.reserves("mnist"), mixed.reserves("my_source")) == (0, 200)
    assert mixed.content()["val_reserve"] == 200  # it enters the key
    # a build written before the reserve existed reads back as legacy
    old = dataclasses.asdict(B.RECIPES["ci"])
    del old["val_reserve"], old["legacy_split_tasks"]
    assert B.Recipe.from_dict(old).legacy_split_tasks == B.RECIPES["ci"].tasks
    with pytest.raises(ValueError, match="val_reserve"):
        B.Recipe(val_reserve=-1)


def test_the_reserve_comes_before_the_training_draw():
    # 100 inputs, 30 % test → a test pool of 30, a training pool of 70; a reserve of 20 leaves
    # 50 to train on, all drawn (n_train 1000 caps at the pool)
    recipe = B.Recipe(tasks=("toy",), n_train=1000, n_test=1000, val_reserve=20)
    _, _, _, _, train, test, rest = K.split_indices(Toy(), recipe)
    assert (len(train), len(test), len(rest)) == (50, 30, 20)
    assert len({*train, *test, *rest}) == 100  # disjoint, everything used once
    x, _ = K.held_out_split(Toy(), recipe, 200)
    assert sorted(x.tolist()) == sorted(rest.tolist())
    # at most half the training pool: 35 of 70
    _, _, _, _, train, _, rest = K.split_indices(Toy(), recipe.replace(val_reserve=500))
    assert (len(train), len(rest)) == (35, 35)


def test_a_legacy_task_draws_as_before():
    # the draw written out independently: one generator per task, the test pool first, then
    # the training draw from the rest; the whole training pool is trained on, nothing held out
    recipe = B.Recipe(tasks=("toy",), n_train=1000, n_test=1000, legacy_split_tasks=("toy",))
    _, _, _, _, train, test, rest = K.split_indices(Toy(), recipe)
    rng = np.random.default_rng(K.task_seed(0, "toy", "split"))
    order = rng.permutation(100)
    test_pool, train_pool = np.sort(order[:30]), np.sort(order[30:])
    assert np.array_equal(train, rng.permutation(train_pool))
    assert np.array_equal(test, np.sort(rng.permutation(test_pool)))
    assert len(rest) == 0 and len(K.held_out_split(Toy(), recipe, 200)[1]) == 0
