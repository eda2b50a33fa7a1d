"""Test set-up: the TensorFlow backend unless KERAS_BACKEND says otherwise."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fixed_random_seed():
    """Every test starts from the same Keras, numpy and backend seeds."""
    keras.utils.set_random_seed(1234)


# The slowest files, slowest first: run first, so that under
# `pytest -n 2 --dist loadfile --no-loadscope-reorder` (the README's command)
# the long ones overlap instead of one finishing alone at the end. The JAX
# rerun is one test in its own process (about a fifth of the suite).
SLOWEST_FILES = [
    "test_jax_backend.py",
    "test_jax_distribution.py",
    "test_train_lm_example.py",
    "test_gpu_suite.py",
    "test_multi_worker.py",
    "test_models.py",
    "test_presets.py",
    "test_mixed_precision.py",
    "test_reversible_memory.py",
    "test_distribute.py",
    "test_duplication_task.py",
]


def pytest_collection_modifyitems(items):
    """Orders the collected tests by `SLOWEST_FILES`, the rest after them
    in their collection order."""
    def rank(item):
        name = item.path.name
        return (SLOWEST_FILES.index(name) if name in SLOWEST_FILES
                else len(SLOWEST_FILES))
    items.sort(key=rank)
