"""The tensors of a Hugging Face checkpoint, read by name as numpy arrays.

Safetensors files (one, or shards listed in `model.safetensors.index.json`)
are read with `safetensors`' numpy API, without torch; a PyTorch
`pytorch_model.bin` needs torch.
"""

import contextlib

from keras_hub.src.utils.preset_utils import check_file_exists
from keras_hub.src.utils.preset_utils import get_file
from keras_hub.src.utils.preset_utils import load_json

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"


class CheckpointTensors(contextlib.ExitStack):
    """A checkpoint's tensors by name, each read once, with keras-hub's
    `port_weight`; `unread()` names those no weight took.

    Args:
        tensors: dict from names to numpy arrays or to functions returning
            them (read on first use).

    Example:
    >>> tensors = CheckpointTensors({"w": np.ones((2, 3))})
    >>> variable = keras.Variable(np.zeros((3, 2)))
    >>> tensors.port_weight(variable, "w", lambda w, shape: w.T)
    >>> variable.numpy().tolist(), tensors.unread()
    ([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], [])
    """

    def __init__(self, tensors):
        super().__init__()
        self._tensors = dict(tensors)
        self._read = set()

    @classmethod
    def from_directory(cls, preset):
        """The tensors of the safetensors or PyTorch file(s) in `preset`."""
        if check_file_exists(preset, SAFETENSORS_INDEX_FILE):
            files = sorted(set(load_json(
                preset, SAFETENSORS_INDEX_FILE)["weight_map"].values()))
        elif check_file_exists(preset, SAFETENSORS_FILE):
            files = [SAFETENSORS_FILE]
        elif check_file_exists(preset, PYTORCH_FILE):
            return cls(_pytorch_tensors(get_file(preset, PYTORCH_FILE)))
        else:
            raise ValueError(
                f"{preset} holds no weights: expected {SAFETENSORS_FILE}, "
                f"{SAFETENSORS_INDEX_FILE} or {PYTORCH_FILE}, as written by "
                "transformers' save_pretrained.")
        import safetensors

        tensors = cls({})
        for name in files:
            file = tensors.enter_context(safetensors.safe_open(
                get_file(preset, name), framework="np"))
            tensors._tensors.update(
                {key: _reader(file, key) for key in file.keys()})
        return tensors

    def names(self):
        """Every tensor name in the checkpoint."""
        return set(self._tensors)

    def get_tensor(self, name):
        """The tensor `name` as a numpy array."""
        if name not in self._tensors:
            raise ValueError(
                f"The checkpoint has no tensor {name!r}; it has "
                f"{len(self._tensors)} tensors, such as "
                f"{sorted(self._tensors)[:5]}.")
        self._read.add(name)
        tensor = self._tensors[name]
        return tensor() if callable(tensor) else tensor

    def port_weight(self, keras_variable, name, hook_fn=None):
        """Assigns tensor `name`, through `hook_fn(tensor, variable_shape)`
        when given, to `keras_variable` (keras-hub's converter helper)."""
        tensor = self.get_tensor(name)
        if hook_fn is not None:
            tensor = hook_fn(tensor, list(keras_variable.shape))
        keras_variable.assign(tensor)

    def unread(self):
        """The names of the tensors not read yet, sorted."""
        return sorted(set(self._tensors) - self._read)


def _reader(file, key):
    return lambda: file.get_tensor(key)


def _pytorch_tensors(path):
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"{path} is a PyTorch checkpoint, which only torch reads. "
            "Install torch (pip install 'keras-reformer[convert]'), or "
            "convert the checkpoint to safetensors (transformers' "
            "save_pretrained writes model.safetensors), which needs no "
            "torch.") from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.detach().numpy() for name, tensor in state.items()}
