"""jaxformer: encoder, decoder and encoder-decoder Transformers in JAX/Flax NNX."""

__version__ = "0.1.0"
