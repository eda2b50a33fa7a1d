"""Hugging Face transformers' Reformer -> keras_reformer, in keras-hub's
converter shape.

`convert_backbone_config` turns a `ReformerConfig` (the dict of its
config.json) into `ReformerBackbone` arguments, `convert_weights` and
`convert_head` port every weight of a `ReformerModelWithLMHead` with one
`port_weight` per weight (the table is `weight_map`), and
`convert_tokenizer` picks the checkpoint's tokenizer. `from_preset` on the
Reformer classes reaches them through `keras_reformer.convert.preset_loader`;
`from_huggingface` converts a model already in memory.
"""

from keras_hub.src.utils.preset_utils import check_file_exists
from keras_hub.src.utils.preset_utils import get_file

from keras_reformer.convert.checkpoint import CheckpointTensors
from keras_reformer.layers import hashing
from keras_reformer.layers.chunked_feed_forward import DEFAULT_CHUNK_LENGTH
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM
from keras_reformer.models import ReformerSentencePieceTokenizer
from keras_reformer.models import ReformerTokenizer

backbone_cls = ReformerBackbone

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu",
                "swish": "silu", "tanh": "tanh"}
SENTENCE_PIECE_FILE = "spiece.model"
# google/reformer-enwik8 reads UTF-8 bytes as ids `byte + 2` (0 pads, 1 is
# unused): 258 ids and no tokenizer file.
BYTE_ID_OFFSET = 2
BYTE_VOCABULARY_SIZE = 256 + BYTE_ID_OFFSET


def convert_backbone_config(transformers_config):
    """`ReformerBackbone` arguments equivalent to a `ReformerConfig`.

    Args:
        transformers_config: dict, a Reformer config.json (or
            `ReformerConfig.to_dict()`).

    Returns:
        A dict of `ReformerBackbone` arguments. `seed` is `hash_seed`, or 0
        without one, so that the fixed inference rotations of a checkpoint
        without `hash_seed` are the same on every load.
    """
    config = _Config(transformers_config)
    problems = []
    if config.get("axial_pos_embds", True) is not True:
        problems.append("axial_pos_embds=False (learned absolute positions)")
    if config["hidden_act"] not in _ACTIVATIONS:
        problems.append(f"hidden_act={config['hidden_act']!r}")
    unknown = sorted(set(config["attn_layers"]) - {"lsh", "local"})
    if unknown:
        problems.append(f"attn_layers with {unknown}")
    num_buckets = config.get("num_buckets")
    if num_buckets is None and "lsh" in config["attn_layers"]:
        problems.append("num_buckets=None (run the model once or set it)")
    if problems:
        raise ValueError("Cannot convert this ReformerConfig: "
                         + "; ".join(problems) + ".")
    if isinstance(num_buckets, (list, tuple)) and len(num_buckets) == 1:
        num_buckets = num_buckets[0]
    options = {
        "lsh": {
            "chunk_length": config["lsh_attn_chunk_length"],
            "num_hashes": config["num_hashes"],
            "num_buckets": num_buckets,
            "num_chunks_before": config["lsh_num_chunks_before"],
            "num_chunks_after": config["lsh_num_chunks_after"],
        },
        "local": {
            "chunk_length": config["local_attn_chunk_length"],
            "num_chunks_before": config["local_num_chunks_before"],
            "num_chunks_after": config["local_num_chunks_after"],
        },
    }
    hash_seed = config.get("hash_seed")
    return {
        "vocabulary_size": config["vocab_size"],
        "hidden_dim": config["hidden_size"],
        "num_heads": config["num_attention_heads"],
        "head_dim": config["attention_head_size"],
        "intermediate_dim": config["feed_forward_size"],
        "attention_types": list(config["attn_layers"]),
        "attention_options": {kind: options[kind]
                              for kind in dict.fromkeys(config["attn_layers"])},
        "axial_shape": tuple(config["axial_pos_shape"]),
        "axial_dims": tuple(config["axial_pos_embds_dim"]),
        "causal": bool(config.get("is_decoder", False)),
        "feed_forward_chunk_length": config.get("chunk_size_feed_forward")
        or DEFAULT_CHUNK_LENGTH,
        "activation": _ACTIVATIONS[config["hidden_act"]],
        "layer_norm_epsilon": config["layer_norm_eps"],
        "seed": 0 if hash_seed is None else hash_seed,
    }


def _transpose(tensor, shape):
    """torch Linear weight -> Keras kernel of `shape`: `(out, in)` becomes
    `(in, out)`, then the heads split out (`(hidden, heads, head_dim)` or
    `(heads, head_dim, hidden)`)."""
    return tensor.T.reshape(shape)


def _reshape(tensor, shape):
    return tensor.reshape(shape)


# Each attention type's projections: our kernel -> transformers' Linear,
# below `reformer.encoder.layers.{i}.attention.`.
ATTENTION_PROJECTIONS = {
    "lsh": {"query_key_dense.kernel": "self_attention.query_key",
            "value_dense.kernel": "self_attention.value",
            "output_dense.kernel": "output.dense"},
    "local": {"query_dense.kernel": "self_attention.query",
              "key_dense.kernel": "self_attention.key",
              "value_dense.kernel": "self_attention.value",
              "output_dense.kernel": "output.dense"},
}
# The feed-forward's weights -> transformers' names (and transform), below
# `reformer.encoder.layers.{i}.feed_forward.`.
FEED_FORWARD_WEIGHTS = {
    "intermediate_dense.kernel": ("dense.dense.weight", _transpose),
    "intermediate_dense.bias": ("dense.dense.bias", None),
    "output_dense.kernel": ("output.dense.weight", _transpose),
    "output_dense.bias": ("output.dense.bias", None),
}


def weight_map(backbone):
    """Every backbone weight with its transformers name and transform.

    Args:
        backbone: a `ReformerBackbone` of "lsh" and "local" layers.

    Returns:
        A list of `(variable, name, hook_fn)`, `hook_fn(tensor, shape)`
        turning the checkpoint's tensor into the variable's value (None:
        as it is).
    """
    position = backbone.position_embedding
    prefix = "reformer.embeddings."
    weights = [
        (backbone.token_embedding.embeddings,
         prefix + "word_embeddings.weight", None),
        (position.row_embeddings,
         prefix + "position_embeddings.weights.0", _reshape),
        (position.column_embeddings,
         prefix + "position_embeddings.weights.1", _reshape),
    ]
    blocks = backbone.reversible_stack.blocks
    for i, (kind, block) in enumerate(zip(backbone.attention_types, blocks)):
        prefix = f"reformer.encoder.layers.{i}."
        weights += _norm_weights(block.f.norm, prefix + "attention.layer_norm")
        weights += [
            (_attribute(block.f.layer, attribute),
             f"{prefix}attention.{name}.weight", _transpose)
            for attribute, name in ATTENTION_PROJECTIONS[kind].items()]
        weights += _norm_weights(block.g.norm,
                                 prefix + "feed_forward.layer_norm")
        weights += [
            (_attribute(block.g.layer, attribute),
             f"{prefix}feed_forward.{name}", hook_fn)
            for attribute, (name, hook_fn) in FEED_FORWARD_WEIGHTS.items()]
    return weights + _norm_weights(backbone.final_norm,
                                   "reformer.encoder.layer_norm")


def _norm_weights(norm, name):
    return [(norm.gamma, name + ".weight", None),
            (norm.beta, name + ".bias", None)]


def _attribute(layer, path):
    """`layer.a.b` for the dotted `path` "a.b"."""
    for name in path.split("."):
        layer = getattr(layer, name)
    return layer


def convert_weights(backbone, loader, transformers_config):
    """Ports every backbone weight from `loader` (keras-hub's converter
    interface) and, with `hash_seed` set, Hugging Face's LSH rotations."""
    for variable, name, hook_fn in weight_map(backbone):
        loader.port_weight(variable, name, hook_fn)
    hash_seed = transformers_config.get("hash_seed")
    if hash_seed is None:
        return
    for kind, attention in zip(backbone.attention_types,
                               backbone.attention_layers):
        if kind == "lsh":
            attention.rotations.assign(huggingface_rotations(
                transformers_config, attention.head_dim,
                attention.resolved_num_buckets))


def convert_head(task, loader, transformers_config):
    """Ports the LM head of a `ReformerModelWithLMHead` onto a
    `ReformerCausalLM`'s `lm_head`."""
    del transformers_config  # the head has no settings
    loader.port_weight(task.lm_head.kernel, "lm_head.decoder.weight",
                       _transpose)
    # `lm_head.bias` and `lm_head.decoder.bias` are one tensor, which a
    # checkpoint may hold under either name or both.
    names = loader.names() & {"lm_head.bias", "lm_head.decoder.bias"}
    for name in sorted(names):
        loader.port_weight(task.lm_head.bias, name)


def huggingface_rotations(transformers_config, head_dim, num_buckets):
    """The rotations Hugging Face's LSH layers draw with `hash_seed`.

    Every LSH layer re-seeds torch's generator with `hash_seed` and draws a
    `(heads, head_dim, num_hashes, columns)` standard normal tensor; only
    torch reproduces those numbers.
    """
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"This Reformer config sets hash_seed="
            f"{transformers_config['hash_seed']}: Hugging Face draws its LSH "
            "rotations from it with torch's random generator, and only torch "
            "reproduces them. Install torch (pip install "
            "'keras-reformer[convert]'), or set hash_seed to null in "
            "config.json to use this package's own fixed rotations (LSH "
            "buckets then differ from Hugging Face's).") from error
    torch.manual_seed(transformers_config["hash_seed"])
    shape = (transformers_config["num_attention_heads"], head_dim,
             transformers_config["num_hashes"],
             hashing.rotation_columns(num_buckets))
    return torch.randn(shape, dtype=torch.float32).numpy()


def convert_tokenizer(cls, preset, transformers_config, **kwargs):
    """The checkpoint's tokenizer, chosen by the directory's contents.

    A directory holding `spiece.model` gets a
    `ReformerSentencePieceTokenizer` of that model (as
    google/reformer-crime-and-punishment); one without it whose
    `vocab_size` is 258 gets `ReformerTokenizer(id_offset=2)`, UTF-8 bytes
    as ids `byte + 2` (as google/reformer-enwik8). Any other raises.

    Args:
        cls: the tokenizer class asked for; the chosen one must be it or a
            subclass.
        preset: the checkpoint directory.
        transformers_config: dict, its config.json.
        **kwargs: more tokenizer arguments.
    """
    vocab_size = transformers_config["vocab_size"]
    if check_file_exists(preset, SENTENCE_PIECE_FILE):
        tokenizer_cls = ReformerSentencePieceTokenizer
        kwargs = {"proto": get_file(preset, SENTENCE_PIECE_FILE), **kwargs}
    elif vocab_size == BYTE_VOCABULARY_SIZE:
        tokenizer_cls = ReformerTokenizer
        kwargs = {"id_offset": BYTE_ID_OFFSET, **kwargs}
    else:
        raise ValueError(
            f"Cannot tell the tokenizer of {preset}: it holds no "
            f"{SENTENCE_PIECE_FILE} (a SentencePiece model) and its "
            f"vocab_size={vocab_size} is not {BYTE_VOCABULARY_SIZE} (UTF-8 "
            f"bytes as ids byte + {BYTE_ID_OFFSET}, as google/reformer-"
            "enwik8). Load the backbone alone (ReformerBackbone.from_preset) "
            "or pass preprocessor=... to ReformerCausalLM.from_preset.")
    if not issubclass(tokenizer_cls, cls):
        raise ValueError(
            f"{preset} holds a {tokenizer_cls.__name__}'s checkpoint, not a "
            f"{cls.__name__}'s; load it with "
            f"{tokenizer_cls.__name__}.from_preset.")
    tokenizer = tokenizer_cls(**kwargs)
    if tokenizer.vocabulary_size() > vocab_size:
        raise ValueError(
            f"The tokenizer of {preset} has {tokenizer.vocabulary_size()} "
            f"ids, more than the model's vocab_size={vocab_size}.")
    return tokenizer


def from_huggingface(model):
    """A `ReformerCausalLM` with the weights of a transformers
    `ReformerModelWithLMHead` in memory (for a directory written by
    `save_pretrained`, use `ReformerCausalLM.from_preset(path)`).

    With `config.hash_seed` set, the converted model's fixed inference
    rotations are the ones Hugging Face draws, so both hash alike.

    Args:
        model: a `transformers.ReformerModelWithLMHead`.

    Returns:
        A `ReformerCausalLM` without a preprocessor whose inference logits
        equal the Hugging Face model's in eval mode.

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
    >>> lm = from_huggingface(hf)
    >>> lm.backbone.attention_types
    ['local', 'lsh']
    """
    config = model.config.to_dict()
    lm = ReformerCausalLM(ReformerBackbone(**convert_backbone_config(config)))
    with CheckpointTensors(
            {name: value.detach().cpu().numpy()
             for name, value in model.state_dict().items()}) as tensors:
        convert_weights(lm.backbone, tensors, config)
        convert_head(lm, tensors, config)
        check_all_read(tensors)
    return lm


def check_all_read(tensors):
    """Raises unless every tensor of the checkpoint was converted."""
    if tensors.unread():
        raise ValueError(f"Weights not converted: {tensors.unread()}.")


class _Config(dict):
    """A config.json whose missing entries raise a clear error."""

    def __missing__(self, key):
        raise ValueError(
            f"The Reformer config lacks {key!r}, which the conversion needs "
            f"(it has {sorted(self)}).")

