"""Hugging Face transformers' PyTorch Reformer -> keras_reformer `ReformerCausalLM`.

Maps every weight of a `ReformerModelWithLMHead` (embeddings, axial
positions, LSH and local attention, chunked feed-forward, the reversible
layers' norms, the final norm, the LM head) onto a `ReformerCausalLM` built from the
same `ReformerConfig`. torch and transformers are needed only here (the
`convert` extra).
"""

import numpy as np

from keras_reformer.layers.local_self_attention import LocalSelfAttention
from keras_reformer.layers.lsh_self_attention import LSHSelfAttention
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu",
                "swish": "silu", "tanh": "tanh"}


def from_huggingface(model_or_path):
    """A `ReformerCausalLM` with the weights of a Hugging Face Reformer LM.

    LSH buckets depend on random rotations. Hugging Face draws them afresh
    on each call unless `config.hash_seed` is set; with a seed, the
    converted model's fixed inference rotations are the ones Hugging Face
    draws (see `huggingface_rotations`), so both hash identically.

    Args:
        model_or_path: a `transformers.ReformerModelWithLMHead`, or a
            directory saved with `save_pretrained`.

    Returns:
        A `ReformerCausalLM` whose inference logits equal the Hugging Face
        model's in eval mode (for lengths that are multiples of the chunk
        lengths, as Hugging Face pads to those).

    Example:
    >>> import transformers
    >>> config = transformers.ReformerConfig(
    ...     vocab_size=64, hidden_size=32, num_attention_heads=2,
    ...     attention_head_size=16, feed_forward_size=64,
    ...     attn_layers=["local", "lsh"], axial_pos_shape=[8, 16],
    ...     axial_pos_embds_dim=[16, 16], lsh_attn_chunk_length=16,
    ...     local_attn_chunk_length=16, num_buckets=4, is_decoder=True,
    ...     hash_seed=7, max_position_embeddings=128)
    >>> hf = transformers.ReformerModelWithLMHead(config).eval()
    >>> lm = from_huggingface(hf)  # or a directory from save_pretrained
    >>> lm.backbone.attention_types
    ['local', 'lsh']
    """
    if isinstance(model_or_path, str):
        import transformers

        model_or_path = transformers.ReformerModelWithLMHead.from_pretrained(
            model_or_path)
    config = model_or_path.config
    weights = {name: value.detach().cpu().numpy()
               for name, value in model_or_path.state_dict().items()}
    lm = ReformerCausalLM(ReformerBackbone(**backbone_arguments(config)))
    _load_weights(lm, weights, config)
    return lm


def backbone_arguments(config):
    """`ReformerBackbone` arguments equivalent to a `ReformerConfig`."""
    problems = []
    if not config.axial_pos_embds:
        problems.append("axial_pos_embds=False (learned absolute positions)")
    if config.hidden_act not in _ACTIVATIONS:
        problems.append(f"hidden_act={config.hidden_act!r}")
    if config.num_buckets is None and "lsh" in config.attn_layers:
        problems.append("num_buckets=None (run the model once or set it)")
    if problems:
        raise ValueError("Cannot convert this ReformerConfig: "
                         + "; ".join(problems) + ".")
    num_buckets = config.num_buckets
    if isinstance(num_buckets, (list, tuple)) and len(num_buckets) == 1:
        num_buckets = num_buckets[0]
    options = {
        "lsh": {
            "chunk_length": config.lsh_attn_chunk_length,
            "num_hashes": config.num_hashes,
            "num_buckets": num_buckets,
            "num_chunks_before": config.lsh_num_chunks_before,
            "num_chunks_after": config.lsh_num_chunks_after,
        },
        "local": {
            "chunk_length": config.local_attn_chunk_length,
            "num_chunks_before": config.local_num_chunks_before,
            "num_chunks_after": config.local_num_chunks_after,
        },
    }
    return {
        "vocabulary_size": config.vocab_size,
        "hidden_dim": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "head_dim": config.attention_head_size,
        "intermediate_dim": config.feed_forward_size,
        "attention_types": list(config.attn_layers),
        "attention_options": {kind: options[kind]
                              for kind in dict.fromkeys(config.attn_layers)},
        "axial_shape": tuple(config.axial_pos_shape),
        "axial_dims": tuple(config.axial_pos_embds_dim),
        "causal": bool(config.is_decoder),
        "feed_forward_chunk_length": config.chunk_size_feed_forward or 64,
        "activation": _ACTIVATIONS[config.hidden_act],
        "layer_norm_epsilon": config.layer_norm_eps,
    }


def huggingface_rotations(config, head_dim, num_buckets):
    """The rotations Hugging Face's LSH layers draw with `config.hash_seed`.

    Every LSH layer re-seeds torch with `hash_seed` before drawing a
    `(heads, head_dim, num_hashes, columns)` standard normal tensor.
    """
    import torch

    from keras_reformer.layers import hashing

    torch.manual_seed(config.hash_seed)
    shape = (config.num_attention_heads, head_dim, config.num_hashes,
             hashing.rotation_columns(num_buckets))
    return torch.randn(shape, dtype=torch.float32).numpy()


def _dense_to_heads(weight, num_heads):
    """torch Linear weight `(heads * d, hidden)` -> `(hidden, heads, d)`."""
    return weight.T.reshape(weight.shape[1], num_heads, -1)


def _heads_to_dense(weight, num_heads):
    """torch Linear weight `(hidden, heads * d)` -> `(heads, d, hidden)`."""
    return weight.T.reshape(num_heads, -1, weight.shape[0])


def _load_weights(lm, weights, config):
    backbone = lm.backbone
    heads = config.num_attention_heads

    def take(name):
        return weights.pop(name)

    prefix = "reformer.embeddings."
    backbone.token_embedding.embeddings.assign(
        take(prefix + "word_embeddings.weight"))
    position = backbone.position_embedding
    position.row_embeddings.assign(
        take(prefix + "position_embeddings.weights.0")[:, 0, :])
    position.column_embeddings.assign(
        take(prefix + "position_embeddings.weights.1")[0])

    for i, block in enumerate(backbone.reversible_stack.blocks):
        prefix = f"reformer.encoder.layers.{i}."
        _assign_norm(block.f.norm, take, prefix + "attention.layer_norm")
        attention = block.f.layer
        source = prefix + "attention.self_attention."
        if isinstance(attention, LSHSelfAttention):
            attention.query_key_dense.kernel.assign(
                _dense_to_heads(take(source + "query_key.weight"), heads))
            if config.hash_seed is not None:
                attention.rotations.assign(huggingface_rotations(
                    config, attention.head_dim,
                    attention.resolved_num_buckets))
        elif isinstance(attention, LocalSelfAttention):
            attention.query_dense.kernel.assign(
                _dense_to_heads(take(source + "query.weight"), heads))
            attention.key_dense.kernel.assign(
                _dense_to_heads(take(source + "key.weight"), heads))
        attention.value_dense.kernel.assign(
            _dense_to_heads(take(source + "value.weight"), heads))
        attention.output_dense.kernel.assign(_heads_to_dense(
            take(prefix + "attention.output.dense.weight"), heads))

        _assign_norm(block.g.norm, take, prefix + "feed_forward.layer_norm")
        feed_forward = block.g.layer
        source = prefix + "feed_forward."
        feed_forward.intermediate_dense.kernel.assign(
            take(source + "dense.dense.weight").T)
        feed_forward.intermediate_dense.bias.assign(
            take(source + "dense.dense.bias"))
        feed_forward.output_dense.kernel.assign(
            take(source + "output.dense.weight").T)
        feed_forward.output_dense.bias.assign(
            take(source + "output.dense.bias"))

    _assign_norm(backbone.final_norm, take, "reformer.encoder.layer_norm")
    head = lm.lm_head
    head.kernel.assign(take("lm_head.decoder.weight").T)
    head.bias.assign(take("lm_head.bias"))
    # The decoder's bias is the same tensor as lm_head.bias.
    weights.pop("lm_head.decoder.bias", None)
    if weights:
        raise ValueError(f"Weights not converted: {sorted(weights)}.")


def _assign_norm(norm, take, name):
    norm.gamma.assign(take(name + ".weight"))
    norm.beta.assign(take(name + ".bias"))
    assert np.all(np.isfinite(norm.gamma.numpy()))
