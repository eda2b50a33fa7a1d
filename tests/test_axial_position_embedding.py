"""AxialPositionEmbedding against a hand computation."""

import numpy as np
import pytest

from keras_reformer.layers import AxialPositionEmbedding
from tests.helpers import to_numpy


def test_equals_hand_computation():
    layer = AxialPositionEmbedding(axial_shape=(4, 8), axial_dims=(6, 10))
    inputs = np.zeros((2, 27, 16), "float32")
    out = to_numpy(layer(inputs))
    rows, columns = [to_numpy(w) for w in layer.get_weights()]
    assert out.shape == (2, 27, 16)
    for t in range(27):
        expected = np.concatenate([rows[t // 8], columns[t % 8]])
        np.testing.assert_array_equal(out[0, t], expected)
        np.testing.assert_array_equal(out[1, t], expected)


def test_full_length_is_every_row_column_pair():
    layer = AxialPositionEmbedding(axial_shape=(3, 5), axial_dims=(2, 2))
    out = to_numpy(layer(np.zeros((1, 15, 4), "float32")))[0]
    assert len({tuple(v) for v in out}) == 15


@pytest.mark.parametrize("kwargs,shape,message", [
    ({"axial_shape": (4, 8), "axial_dims": (6, 10)}, (1, 33, 16), "33"),
    ({"axial_shape": (4, 8), "axial_dims": (6, 9)}, (1, 8, 16), "sum"),
])
def test_bad_shapes_raise(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        AxialPositionEmbedding(**kwargs)(np.zeros(shape, "float32"))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="axial_shape"):
        AxialPositionEmbedding(axial_shape=(4,), axial_dims=(2, 2))
    with pytest.raises(ValueError, match="axial_dims"):
        AxialPositionEmbedding(axial_shape=(4, 4), axial_dims=(0, 2))
