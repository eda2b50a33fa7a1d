"""On the path of a Python process, makes TensorFlow impossible to import
and invisible to `importlib.util.find_spec`, as on the GPU benchmark
machine, which has no TensorFlow build."""

import importlib.util
import sys

BLOCKED = ("tensorflow", "tensorflow_text", "tensorflow_datasets", "tf_keras")


def _blocked(name):
    return name.split(".")[0] in BLOCKED


class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(
                f"No module named {name!r} (this process stands in for a "
                "machine without TensorFlow)", name=name)
        return None


_find_spec = importlib.util.find_spec


def _find_spec_without_tensorflow(name, package=None):
    if _blocked(name):
        return None
    return _find_spec(name, package)


sys.meta_path.insert(0, _NoTensorFlow())
importlib.util.find_spec = _find_spec_without_tensorflow
