"""keras_reformer models."""

from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_causal_lm import ReformerCausalLM
from keras_reformer.models.reformer_classifier import MaskedMeanPooling
from keras_reformer.models.reformer_classifier import ReformerClassifier
