"""keras_reformer models."""

from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_lm import MaskedMeanPooling
from keras_reformer.models.reformer_lm import ReformerClassifier
from keras_reformer.models.reformer_lm import ReformerLM
