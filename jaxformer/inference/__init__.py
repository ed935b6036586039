"""Generation (KV-cached greedy, sampling, beam search) and int8 weight quantization for serving."""

from jaxformer.inference.generate import METHODS, DecodeOptions, beam_search, generate
from jaxformer.inference.quantize import param_bytes, quantize_model

__all__ = ["generate", "beam_search", "DecodeOptions", "METHODS", "quantize_model", "param_bytes"]
