"""jaxformer: encoder, decoder and encoder-decoder Transformers in JAX/Flax NNX."""

# First, before any submodule imports jax: on a host with libtpu but no TPU, JAX's backend search
# would load libtpu, which prints a spurious TPU_WORKER_HOSTNAMES error (see _platform.py).
from jaxformer import _platform

_platform.skip_tpu_probe()

__version__ = "0.1.0"
