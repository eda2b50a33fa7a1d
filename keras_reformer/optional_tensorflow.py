"""TensorFlow where it is installed, else a stand-in that says what needs it.

The layers and models run on the JAX backend without TensorFlow (as on
machines that have no TensorFlow build); the tf.data pipelines, tokenizers
and preprocessors need it.
"""

try:
    import tensorflow as tf

    TENSORFLOW_INSTALLED = True
except ImportError:
    TENSORFLOW_INSTALLED = False

    class _MissingTensorFlow:
        def __getattr__(self, name):
            raise ImportError(
                f"tf.{name} is needed here, and TensorFlow is not installed: "
                "keras_reformer's text pipelines, tokenizers and "
                "preprocessors need it (pip install tensorflow); the layers "
                "and models also run without it on the JAX backend.")

    tf = _MissingTensorFlow()
