"""keras_reformer models."""

from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_causal_lm import ReformerCausalLM
from keras_reformer.models.reformer_causal_lm_preprocessor import (
    ReformerCausalLMPreprocessor)
from keras_reformer.models.reformer_classifier import MaskedMeanPooling
from keras_reformer.models.reformer_classifier import ReformerClassifier
from keras_reformer.models.reformer_masked_lm import GatherPositions
from keras_reformer.models.reformer_masked_lm import ReformerMaskedLM
from keras_reformer.models.reformer_masked_lm_preprocessor import (
    ReformerMaskedLMPreprocessor)
from keras_reformer.models.reformer_tokenizer import (
    ReformerSentencePieceTokenizer)
from keras_reformer.models.reformer_tokenizer import ReformerTokenizer
