"""Causal language model on a `ReformerBackbone`, with cached generation."""

import keras
import keras_hub
import numpy as np
from keras import ops

from keras_reformer.layers.validation import check_positive_int
from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_causal_lm_preprocessor import (
    ReformerCausalLMPreprocessor)
from keras_reformer.models.reformer_task import ReformerTask
from keras_reformer.models.token_inputs import check_token_values

# The keras-hub samplers `compile(sampler=...)` takes by name.
SAMPLERS = ("beam", "contrastive", "greedy", "random", "top_k", "top_p")


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerCausalLM(ReformerTask, keras_hub.models.CausalLM):
    """Causal language model: backbone features -> next-token logits.

    Takes the backbone's inputs (`token_ids`, `padding_mask`) and returns
    logits `(batch, length, vocabulary_size)`. A keras-hub `CausalLM`:
    compiled on construction with its defaults, `compile(sampler=...)`,
    `generate()` on strings (with a preprocessor), on a dict of token ids
    or on a `tf.data.Dataset`, presets (`save_to_preset`, `from_preset`).
    What is Reformer-specific is the decoding: each layer caches what later
    tokens need (keys, values, and for LSH the buckets and sorted order of
    every round), so a new token costs one position's work, not a pass over
    the sequence (`call_with_cache`, `build_cache`, `generate_step`).

    Args:
        backbone: a causal `ReformerBackbone`.
        preprocessor: optional `keras_hub.models.CausalLMPreprocessor`
            (e.g. `keras_reformer.text_data.byte_preprocessor()`); lets
            `fit` and `generate()` take strings.
        head_dtype: None (the backbone's dtype policy) or the head's own
            policy; `get_config` records it once `quantize` has made the
            head int8.

    Example:
    >>> from keras_reformer.models import ReformerBackbone
    >>> from keras_reformer.text_data import byte_preprocessor
    >>> lm = ReformerCausalLM(ReformerBackbone(vocabulary_size=256,
    ...     hidden_dim=32, num_heads=2, head_dim=16, intermediate_dim=64,
    ...     axial_shape=(8, 16),
    ...     attention_options={"lsh": {"chunk_length": 16}}),
    ...     preprocessor=byte_preprocessor(128))
    >>> lm.compile(optimizer="adam", loss=keras.losses.
    ...     SparseCategoricalCrossentropy(from_logits=True), sampler="greedy")
    >>> lm.generate("def ", max_length=32).startswith("def ")
    True
    """

    backbone_cls = ReformerBackbone
    head_attribute = "lm_head"
    preprocessor_cls = ReformerCausalLMPreprocessor
    serves_generation = True

    def __init__(self, backbone, preprocessor=None, head_dtype=None,
                 **kwargs):
        if not backbone.causal:
            raise ValueError(
                "ReformerCausalLM needs a causal backbone; received a "
                "backbone with causal=False.")
        sequence_length = getattr(preprocessor, "sequence_length", None)
        if sequence_length is not None and (
                sequence_length > backbone.max_length):
            raise ValueError(
                f"The preprocessor's sequence_length={sequence_length} is "
                f"longer than the backbone's {backbone.max_length} positions "
                f"(axial_shape={backbone.axial_shape}); pass a "
                f"preprocessor with sequence_length <= {backbone.max_length} "
                f"(e.g. byte_preprocessor({backbone.max_length})).")
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.lm_head = keras.layers.Dense(
            backbone.vocabulary_size,
            dtype=self.head_policy(backbone, head_dtype),
            name="lm_head")

        # === Functional Model ===
        inputs = backbone.input
        logits = self.lm_head(backbone(inputs))
        super().__init__(inputs=inputs, outputs=logits, **kwargs)

    def compile(self, *args, sampler="top_k", **kwargs):
        """keras-hub's `CausalLM.compile`, refusing an unknown `sampler`
        (one of `SAMPLERS` or a `keras_hub.samplers.Sampler`) at once."""
        if not (sampler in SAMPLERS if isinstance(sampler, str) else
                isinstance(sampler, keras_hub.samplers.Sampler)):
            raise ValueError(
                f"sampler must be one of {SAMPLERS} or a "
                f"keras_hub.samplers.Sampler; received sampler={sampler!r}.")
        super().compile(*args, sampler=sampler, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None:
            config["sampler"] = keras_hub.samplers.serialize(self.sampler)
        return config

    def compile_from_config(self, config):
        config = dict(config)
        sampler = config.pop("sampler", None)
        super().compile_from_config(config)
        if sampler is not None:
            self.sampler = keras_hub.samplers.deserialize(sampler)

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """Logits of one new token from the cache (keras-hub's interface).

        Args:
            token_ids: `(batch, 1)` int, the token at `cache_update_index`.
            cache: the cache from `build_cache` or the previous call.
            cache_update_index: int scalar, its position.

        Returns:
            `(logits, hidden_states, cache)`: `(batch, 1, vocabulary)`,
            `(batch, 1, 2 * hidden_dim)` and the updated cache.
        """
        features, cache = self.backbone.call_with_cache(
            token_ids, cache, cache_update_index)
        return self.lm_head(features), features, cache

    def build_cache(self, token_ids, prefix_length):
        """Runs the prefix `token_ids[:, :prefix_length]` of the `(batch,
        capacity)` buffer and returns `(hidden_states, cache)` with room for
        `capacity` positions."""
        return self.backbone.call_with_cache(token_ids, None, prefix_length)

    def generate_step(self, inputs, stop_token_ids=None, sampler=None,
                      process_logits=None):
        """Fills one batch's buffer after each prompt (compilable).

        Args:
            inputs: dict of `token_ids` and `padding_mask`, `(batch,
                capacity)`: each row's prompt, right-padded.
            stop_token_ids: None or a tuple of ids ending a row.
            sampler: keras-hub sampler; default `self.sampler`.
            process_logits: None or `f(logits, index) -> logits` applied to
                each step's logits (used by the serving signature).

        Returns:
            dict of the filled `token_ids` and a `padding_mask` that is
            False after a generated stop token.
        """
        token_ids = ops.convert_to_tensor(inputs["token_ids"], "int32")
        prompt_mask = ops.cast(inputs["padding_mask"], "bool")
        # Every row's prompt has at least one token (checked in generate);
        # the cache holds the tokens before the first one to feed.
        index = ops.maximum(
            ops.min(ops.sum(ops.cast(prompt_mask, "int32"), axis=-1)), 1)
        hidden_states, cache = self.build_cache(token_ids, index - 1)

        def next(prompt, cache, index):
            batch = ops.shape(prompt)[0]
            token = ops.slice(prompt, [0, index - 1], [batch, 1])
            logits, hidden, cache = self.call_with_cache(
                token, cache, index - 1)
            logits = ops.cast(logits[:, 0], "float32")
            if process_logits is not None:
                logits = process_logits(logits, index)
            return logits, hidden[:, 0], cache

        token_ids = (sampler or self.sampler)(
            next=next, prompt=token_ids, cache=cache, index=index,
            mask=prompt_mask, stop_token_ids=stop_token_ids,
            hidden_states=hidden_states, model=self)
        return {"token_ids": token_ids,
                "padding_mask": _before_stop(token_ids, prompt_mask,
                                             stop_token_ids)}

    def generate(self, inputs, max_length=None, stop_token_ids="auto",
                 strip_prompt=False):
        """keras-hub's `CausalLM.generate`, with every prompt checked first.

        Args:
            inputs: a string or list of strings (needs a `preprocessor`), a
                `tf.data.Dataset` of them, or a dict of `token_ids` and
                `padding_mask` `(batch, length)` (right-padded prompts, ids
                whole numbers, mask 0s and 1s).
            max_length: int, total tokens per row (prompt included), at
                least the longest prompt; default the preprocessor's
                `sequence_length` or the dict's length.
            stop_token_ids: "auto" (the tokenizer's end token, if it has
                one), None, a token id, or a list of ids that end a row.
            strip_prompt: bool, return only the generated part (for a dict:
                `padding_mask` False over the prompt).

        Returns:
            Strings for string inputs; otherwise a dict of numpy `token_ids`
            and `padding_mask` (False after a stop token).

        Raises:
            ValueError: a prompt longer than `max_length` or the model (it
                would be cut), bad ids or masks, or a bad argument.
        """
        if max_length is not None:
            if isinstance(max_length, np.integer):
                max_length = int(max_length)
            check_positive_int("max_length", max_length)
        stop = self._stop_tuple(stop_token_ids)
        if isinstance(inputs, dict):
            return self._generate_from_ids(inputs, max_length, stop,
                                           strip_prompt)
        if isinstance(inputs, str) or (
                isinstance(inputs, (list, tuple)) and inputs
                and all(isinstance(x, str) for x in inputs)):
            self._check_text_prompts(inputs, max_length)
        return super().generate(inputs, max_length=max_length,
                                stop_token_ids=stop,
                                strip_prompt=strip_prompt)

    def _generate_from_ids(self, inputs, max_length, stop, strip_prompt):
        batch = self._token_prompts(inputs)
        self._check_prompts(batch)
        batch = self._fit_prompts(
            batch, batch["token_ids"].shape[1] if max_length is None
            else max_length)
        outputs = self.make_generate_function()(
            {k: ops.convert_to_tensor(v, "int32") for k, v in batch.items()},
            stop_token_ids=stop)
        outputs = {k: ops.convert_to_numpy(v) for k, v in outputs.items()}
        if strip_prompt:
            outputs["padding_mask"] = np.logical_and(
                outputs["padding_mask"], batch["padding_mask"] == 0)
        return outputs

    def _check_text_prompts(self, inputs, max_length):
        """Tokenizes the prompts one position wider than the model (so a
        prompt too long is counted, never cut) and checks them."""
        if self.preprocessor is None:
            raise ValueError(
                "generate() received text but this ReformerCausalLM has "
                "no preprocessor; pass a dict of token_ids and "
                "padding_mask, or build the model with a preprocessor.")
        batch = self.preprocessor.generate_preprocess(
            [inputs] if isinstance(inputs, str) else list(inputs),
            sequence_length=self.backbone.max_length + 1)
        batch = {k: np.asarray(ops.convert_to_numpy(v))
                 for k, v in batch.items()}
        self._check_prompts(batch)
        self._fit_prompts(batch, self.preprocessor.sequence_length
                          if max_length is None else max_length)

    def _token_prompts(self, inputs):
        if not isinstance(inputs, dict) or set(inputs) != {
                "token_ids", "padding_mask"}:
            raise ValueError(
                "generate() takes text (with a preprocessor) or a dict with "
                "exactly the keys 'token_ids' and 'padding_mask'; received "
                f"{type(inputs).__name__}"
                f"{sorted(inputs) if isinstance(inputs, dict) else ''}.")
        batch = {k: np.asarray(ops.convert_to_numpy(v))
                 for k, v in inputs.items()}
        shapes = [batch[k].shape for k in ("token_ids", "padding_mask")]
        if len(shapes[0]) != 2 or shapes[1] != shapes[0]:
            raise ValueError(
                "token_ids and padding_mask must both be (batch, length); "
                f"received shapes {shapes[0]} and {shapes[1]}.")
        check_token_values(batch)
        return {k: v.astype("int32") for k, v in batch.items()}

    def _check_prompts(self, batch):
        token_ids, mask = batch["token_ids"], batch["padding_mask"].astype(bool)
        lengths = mask.sum(axis=1)
        if np.any(lengths == 0):
            raise ValueError(
                "Every prompt needs at least one token; rows "
                f"{np.flatnonzero(lengths == 0).tolist()} are empty.")
        if np.any(mask != (np.arange(mask.shape[1]) < lengths[:, None])):
            raise ValueError("Prompts must be right-padded: padding_mask "
                             "must be 1s followed by 0s in every row.")
        vocabulary = self.backbone.vocabulary_size
        real = token_ids[mask]
        if real.size and (real.min() < 0 or real.max() >= vocabulary):
            raise ValueError(
                f"token ids must be in [0, {vocabulary}); received prompt ids "
                f"from {real.min()} to {real.max()}.")

    def _fit_prompts(self, batch, max_length):
        """The right-padded `batch` padded or cut to `max_length` columns,
        after checking that every prompt fits in it and the model."""
        capacity = self.backbone.max_length
        if max_length > capacity:
            raise ValueError(
                f"max_length={max_length} exceeds the model's {capacity} "
                f"positions (axial_shape={self.backbone.axial_shape}).")
        lengths = batch["padding_mask"].sum(axis=1)
        longest = int(lengths.max()) if lengths.size else 0
        if longest > max_length:
            prompt = (f"{longest} tokens" if longest <= capacity
                      else f"more than {capacity} tokens")
            raise ValueError(
                f"max_length={max_length} is shorter than the longest "
                f"prompt (row {int(lengths.argmax())}: {prompt}); max_length "
                "counts the prompt and the generated tokens.")
        width = batch["token_ids"].shape[1]
        extra = ((0, 0), (0, max(max_length - width, 0)))
        return {k: np.pad(v[:, :max_length], extra) for k, v in batch.items()}

    def _stop_tuple(self, stop_token_ids):
        """`stop_token_ids` ("auto", None, an id or ids) as None or a
        tuple; "auto" is the tokenizer's end token, if it has one."""
        if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
            tokenizer = getattr(self.preprocessor, "tokenizer", None)
            stop_token_ids = getattr(tokenizer, "end_token_id", None)
        if stop_token_ids is None:
            return None
        is_one_id = isinstance(stop_token_ids, (int, np.integer))
        stops = [stop_token_ids] if is_one_id else stop_token_ids
        vocabulary = self.backbone.vocabulary_size
        try:
            stops = tuple(stops)
        except TypeError:
            stops = None
        if not stops or not all(
                isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                and 0 <= s < vocabulary for s in stops):
            raise ValueError(
                f"stop_token_ids must be None, a token id or a non-empty list "
                f"of token ids in [0, {vocabulary}); received stop_token_ids="
                f"{stop_token_ids!r}.")
        return tuple(int(s) for s in stops)

def _before_stop(token_ids, prompt_mask, stop_token_ids):
    """False after the first generated stop token of each row."""
    if stop_token_ids is None:
        return ops.ones_like(prompt_mask, "bool")
    generated = ops.logical_not(prompt_mask)
    stops = ops.zeros_like(prompt_mask, "bool")
    for stop in stop_token_ids:
        stops = ops.logical_or(stops, ops.equal(token_ids, stop))
    stops = ops.cast(ops.logical_and(stops, generated), "int32")
    return ops.cumsum(stops, axis=-1) - stops == 0
