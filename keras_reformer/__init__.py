"""keras-reformer: the Reformer as composable Keras 3 layers.

TensorFlow is the default backend: importing this package before Keras sets
`KERAS_BACKEND=tensorflow` unless the variable is already set.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Everything a saved model may name is registered on import, so that
# `keras.saving.load_model` finds it after `import keras_reformer`.
from keras_reformer import layers  # noqa: E402
from keras_reformer import metrics  # noqa: E402
from keras_reformer import models  # noqa: E402
from keras_reformer import text_data  # noqa: E402

__version__ = "0.1.0"
