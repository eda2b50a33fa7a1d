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
