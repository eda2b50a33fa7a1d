"""keras_reformer layers."""

from keras_reformer.layers.axial_position_embedding import AxialPositionEmbedding
from keras_reformer.layers.chunked_feed_forward import ChunkedFeedForward
from keras_reformer.layers.full_self_attention import FullSelfAttention
from keras_reformer.layers.lsh_self_attention import LSHSelfAttention
from keras_reformer.layers.pre_norm_branch import PreNormBranch
from keras_reformer.layers.reversible import ReversibleBlock
from keras_reformer.layers.reversible import ReversibleStack
