"""Converters from other Reformer implementations' checkpoints."""

from keras_reformer.convert.huggingface import from_huggingface
from keras_reformer.convert.huggingface import huggingface_rotations
