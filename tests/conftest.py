"""Test set-up: the TensorFlow backend unless KERAS_BACKEND says otherwise."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
