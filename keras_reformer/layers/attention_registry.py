"""Attention types by name, for `ReformerBackbone(attention_types=...)`."""

from keras_reformer.layers.attention_layer import AttentionLayer

_ATTENTION_TYPES = {}


def register_attention(name, **defaults):
    """Class decorator: makes an `AttentionLayer` subclass an attention type.

    Args:
        name: str, the name `attention_types` and `attention_options` use.
        **defaults: options the type passes to `from_backbone` unless
            `attention_options` overrides them (one class can serve several
            types: "full" and "full_shared_qk" differ in `shared_qk`).

    Returns:
        The decorator, which returns the class unchanged.

    Example:
    >>> from keras_reformer.layers import FullSelfAttention
    >>> @register_attention("my_full")
    ... class MyFullAttention(FullSelfAttention):
    ...     pass
    >>> attention_type("my_full")[0].__name__
    'MyFullAttention'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"An attention type's name must be a non-empty string; received "
            f"name={name!r}.")

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, AttentionLayer)):
            raise TypeError(
                f"register_attention({name!r}) takes a subclass of "
                f"keras_reformer.layers.AttentionLayer; received {cls!r}.")
        known = _ATTENTION_TYPES.get(name)
        if known is not None and known[0].__qualname__ != cls.__qualname__:
            raise ValueError(
                f"The attention type {name!r} is already registered for "
                f"{known[0].__name__}; choose another name for "
                f"{cls.__name__}.")
        _ATTENTION_TYPES[name] = (cls, dict(defaults))
        return cls

    return register


def attention_type(name, argument="name"):
    """`(class, default options)` of the attention type `name`.

    Args:
        name: str, a registered name.
        argument: str, where `name` came from, for the error message.

    Raises:
        ValueError: `name` is not registered; says which names are.
    """
    if not isinstance(name, str) or name not in _ATTENTION_TYPES:
        raise ValueError(
            f"Unknown attention type {name!r} in {argument}; registered "
            f"types are "
            f"{attention_type_names()} (register your own with "
            "keras_reformer.layers.register_attention).")
    return _ATTENTION_TYPES[name]


def attention_type_names():
    """The registered attention types' names, in registration order."""
    return tuple(_ATTENTION_TYPES)
