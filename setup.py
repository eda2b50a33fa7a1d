"""keras-reformer: Reformer and efficient attention as Keras 3 layers."""

from setuptools import find_packages
from setuptools import setup

# The parity tests run Hugging Face's PyTorch Reformer. torch is pinned to
# the CPU build these machines carry (a looser range downloads a CUDA build
# of several GB).
CONVERT = ["torch==2.13.0", "transformers>=5,<6"]

setup(
    name="keras-reformer",
    version="0.1.0",
    description=(
        "The Reformer (LSH attention, reversible layers, chunked "
        "feed-forward, axial positions) as composable Keras 3 layers."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_reformer", "keras_reformer.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "keras-hub>=0.32,<0.33",
        "tensorflow-datasets>=4.9.10,<4.10",
        # tensorflow-datasets 4.9.10 fails to import without it on 3.11.
        "importlib_resources>=6,<8",
        "numpy>=1.26,<3",
    ],
    extras_require={
        # keras_reformer.convert: Hugging Face PyTorch checkpoints.
        "convert": CONVERT,
        # benchmarks/ write PNG plots beside their JSON lines and measure
        # the PyTorch peers (Hugging Face's and reformer-pytorch's layers).
        "benchmarks": ["matplotlib>=3.8,<4", "reformer-pytorch>=1.4.4,<1.5"]
        + CONVERT,
        "test": [
            "pytest>=8,<10",
            # The suite runs on two processes (README's test command).
            "pytest-xdist>=3.6,<4",
            "hypothesis>=6,<7",
            # tests/test_tokenizers.py trains a SentencePiece model.
            "sentencepiece>=0.2,<0.3",
            # The JAX backend tests (reversible custom_vjp) run on the CPU.
            "jax[cpu]>=0.10,<0.11",
            # The benchmark scripts' smoke tests draw their plots.
            "matplotlib>=3.8,<4",
            # Keras's TensorBoard callback (examples/train_lm.py
            # --tensorboard-dir) and reading its logs back.
            "tensorboard>=2.20,<3",
        ] + CONVERT,
    },
)
