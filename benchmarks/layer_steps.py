"""One attention layer's forward+backward step, ours and the peers'.

Every implementation takes one sequence (batch 1) of `length` tokens, width
`heads * 64`, and computes the gradients of the sum of the squared outputs
with respect to the input and the layer's weights (the layer's whole
training work). The configuration is issue #8's layer table: heads of 64,
causal, 4 hash rounds, chunks of 64 with one chunk of look-back, default
bucket counts. `STEPS[name](length, heads)` returns a function that runs
one step and waits until it has finished (the `lsh*` ones take more
`LSHSelfAttention` arguments as keywords; ours have `optimized_hlo()`, the
text of the compiled XLA program); `BACKENDS[name]` is the framework
it needs (the benchmarks run each implementation in a process of its own).

* `lsh_tf`, `lsh_jax`: our `LSHSelfAttention` under XLA
  (`tf.function(jit_compile=True)`, `jax.jit`);
* `lsh_by_head`, `lsh_by_run`: the same on JAX with `parallel_heads=1`, and
  with `segments=16` as well (recomputed in the backward pass, less memory);
* `local`, `local_by_run`: our `LocalSelfAttention` on JAX, all chunks at
  once and in 16 recomputed runs;
* `full_tf`: our exact `FullSelfAttention` (TensorFlow, XLA);
* `flash`: `jax.nn.dot_product_attention` in bfloat16 on random queries,
  keys and values (cuDNN's fused kernel on a GPU);
* `huggingface`: transformers' PyTorch `LSHSelfAttention`;
* `reformer_pytorch`: the `reformer-pytorch` package's `LSHSelfAttention`;
* `sdpa`: exact attention with bias-free query, key, value and output
  projections around torch's `scaled_dot_product_attention` (a flash
  kernel on the CPU and the GPU).
"""

import numpy as np

HEAD_DIM = 64
CHUNK_LENGTH = 64
NUM_HASHES = 4


def _inputs(length, heads):
    return np.random.RandomState(0).randn(
        1, length, heads * HEAD_DIM).astype("float32")


def _ours(kind, heads, **options):
    from keras_reformer.layers import FullSelfAttention
    from keras_reformer.layers import LocalSelfAttention
    from keras_reformer.layers import LSHSelfAttention

    if kind == "lsh":
        return LSHSelfAttention(heads, HEAD_DIM, chunk_length=CHUNK_LENGTH,
                                num_hashes=NUM_HASHES, causal=True, **options)
    if kind == "local":
        return LocalSelfAttention(heads, HEAD_DIM, chunk_length=CHUNK_LENGTH,
                                  causal=True, **options)
    return FullSelfAttention(heads, HEAD_DIM, causal=True)


def tf_step(layer, length, heads):
    """Our `layer` under `tf.function(jit_compile=True)`."""
    return tf_gradient_step(layer, _inputs(length, heads))


def tf_gradient_step(layer, inputs):
    """The input and weight gradients of the sum of `layer`'s squared
    outputs for the array `inputs`, under `tf.function(jit_compile=True)`:
    a function running it once, with `optimized_hlo()`."""
    import tensorflow as tf

    layer.build(inputs.shape)
    x = tf.constant(inputs)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(layer(x, training=True),
                                         tf.float32) ** 2)
        return tape.gradient(loss, [x] + layer.trainable_variables)

    run = lambda: [g.numpy() for g in step(x)]  # noqa: E731
    run.optimized_hlo = lambda: step.experimental_get_compiler_ir(x)(
        stage="optimized_hlo")
    return run


def jax_step(layer, length, heads):
    """Our `layer` under `jax.jit` (weights passed in, as in training)."""
    return jax_gradient_step(layer, _inputs(length, heads))


def jax_gradient_step(layer, inputs):
    """`tf_gradient_step` under `jax.jit`, the weights passed in as in
    training; the function also has `compiled`."""
    import jax
    import keras

    from keras_reformer.layers.seeds import seed_tensor

    layer.build(inputs.shape)
    x = jax.numpy.asarray(inputs)
    weights = [v.value for v in layer.trainable_variables]

    def loss(weights, x):
        mapping = list(zip(layer.trainable_variables, weights))
        with keras.StatelessScope(state_mapping=mapping):
            out = layer(x, training=True, seed=seed_tensor(1))
        return jax.numpy.sum(jax.numpy.square(out.astype("float32")))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        weights, x).compile()
    step = lambda: jax.block_until_ready(compiled(weights, x))  # noqa: E731
    step.compiled = compiled
    step.optimized_hlo = compiled.as_text
    return step


def flash_step(length, heads):
    """`jax.nn.dot_product_attention`, bfloat16, causal."""
    import jax
    import jax.numpy as jnp

    on_gpu = jax.devices()[0].platform == "gpu"
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    shape = (1, length, heads, HEAD_DIM)
    q, k, v = [jax.random.normal(key, shape, jnp.bfloat16) for key in keys]

    def loss(q, k, v):
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=True,
            implementation="cudnn" if on_gpu else None)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        q, k, v).compile()
    step = lambda: jax.block_until_ready(compiled(q, k, v))  # noqa: E731
    step.compiled = compiled
    return step


def _torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def huggingface_layer(length, heads):
    """transformers' `LSHSelfAttention` in our configuration."""
    from transformers import ReformerConfig
    from transformers.models.reformer import modeling_reformer

    from keras_reformer.layers import hashing

    num_buckets = hashing.auto_num_buckets(length, CHUNK_LENGTH)
    config = ReformerConfig(
        hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
        attention_head_size=HEAD_DIM, num_hashes=NUM_HASHES,
        lsh_attn_chunk_length=CHUNK_LENGTH, lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        num_buckets=(list(num_buckets) if isinstance(num_buckets, tuple)
                     else num_buckets),
        is_decoder=True, lsh_attention_probs_dropout_prob=0.0,
        attn_layers=["lsh"])
    layer = modeling_reformer.LSHSelfAttention(config)
    return lambda x: layer(x).hidden_states, layer


def reformer_pytorch_layer(length, heads):
    """reformer-pytorch's `LSHSelfAttention` in our configuration (it
    always looks one chunk back)."""
    from reformer_pytorch import LSHSelfAttention

    layer = LSHSelfAttention(
        dim=heads * HEAD_DIM, heads=heads, dim_head=HEAD_DIM,
        bucket_size=CHUNK_LENGTH, n_hashes=NUM_HASHES, causal=True)
    return layer, layer


def sdpa_layer(length, heads):
    """Exact causal attention: bias-free projections around torch's
    `scaled_dot_product_attention`."""
    import torch

    width = heads * HEAD_DIM

    class ExactAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
            self.out = torch.nn.Linear(width, width, bias=False)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, length, 3, heads, HEAD_DIM).unbind(2)
            q, k, v = [t.transpose(1, 2) for t in (q, k, v)]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True)
            return self.out(out.transpose(1, 2).reshape(1, length, width))

    layer = ExactAttention()
    return layer, layer


def torch_step(make_layer, length, heads):
    """Forward+backward of a PyTorch layer (float32)."""
    import torch

    device = _torch_device()
    call, module = make_layer(length, heads)
    module.to(device)
    x = torch.tensor(_inputs(length, heads), device=device,
                     requires_grad=True)

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        call(x).square().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


BACKENDS = {
    "lsh_tf": "tensorflow", "full_tf": "tensorflow",
    "lsh_jax": "jax", "lsh_by_head": "jax", "lsh_by_run": "jax",
    "local": "jax", "local_by_run": "jax", "flash": "jax",
    "huggingface": "torch", "reformer_pytorch": "torch", "sdpa": "torch",
}

STEPS = {
    "lsh_tf": lambda n, h, **o: tf_step(_ours("lsh", h, **o), n, h),
    "full_tf": lambda n, h: tf_step(_ours("full", h), n, h),
    "lsh_jax": lambda n, h, **o: jax_step(_ours("lsh", h, **o), n, h),
    "lsh_by_head": lambda n, h, **o: jax_step(
        _ours("lsh", h, **{"parallel_heads": 1, **o}), n, h),
    "lsh_by_run": lambda n, h, **o: jax_step(
        _ours("lsh", h, **{"parallel_heads": 1, "segments": 16, **o}), n, h),
    "local": lambda n, h: jax_step(_ours("local", h), n, h),
    "local_by_run": lambda n, h: jax_step(_ours("local", h, segments=16),
                                          n, h),
    "flash": flash_step,
    "huggingface": lambda n, h: torch_step(huggingface_layer, n, h),
    "reformer_pytorch": lambda n, h: torch_step(reformer_pytorch_layer, n, h),
    "sdpa": lambda n, h: torch_step(sdpa_layer, n, h),
}


def preload(name):
    """Imports what implementation `name` needs, so that a measurement of
    the resident set that starts afterwards leaves the imports out."""
    import keras  # noqa: F401

    import keras_reformer.layers  # noqa: F401

    backend = BACKENDS[name]
    if backend == "tensorflow":
        import tensorflow  # noqa: F401
    elif backend == "jax":
        import jax  # noqa: F401
    else:
        import torch  # noqa: F401
        import transformers.models.reformer.modeling_reformer  # noqa: F401
    if name == "reformer_pytorch":
        import reformer_pytorch  # noqa: F401


def device_peak_mib(backend):
    """The accelerator's own peak allocation, or None on a CPU."""
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    return None


def planned_mib(step):
    """XLA's planned memory of a JAX step (temporaries, arguments and
    outputs), or None for the others."""
    compiled = getattr(step, "compiled", None)
    if compiled is None:
        return None
    analysis = compiled.memory_analysis()
    return (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes) / 2**20
