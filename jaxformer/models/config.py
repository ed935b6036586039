"""The frozen model configuration shared by the three families, and the named presets."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Optional

from jaxformer.attention import IMPLEMENTATIONS
from jaxformer.config import check_choice
from jaxformer.layers import ACTIVATIONS, NORMS

TABLE_POSITIONS = ("learned", "sinusoidal")
"""Position kinds read from a [max_len, d_model] table, so sequences are at most max_len long."""

# The valid values of each choice field. Names implemented by a table below this module come from
# that table (layers, attention); the tables above it, which import this module (models.FAMILIES,
# models.stack.REMAT_POLICIES), check themselves against the names here; the other fields are read
# by comparisons in the model code, so this is their one list.
CHOICES: dict[str, tuple[str, ...]] = {
    "family": ("decoder", "encoder", "encoder_decoder"),
    "position": (*TABLE_POSITIONS, "rope", "relative", "none"),
    "norm": tuple(NORMS),
    "norm_position": ("pre", "post"),
    "mlp": tuple(ACTIVATIONS),
    "attention_impl": IMPLEMENTATIONS,
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
    "remat": ("none", "full", "dots_saveable", "offload_dots"),
    "pooling": ("first", "mean"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Transformer; everything a model file reads comes from here."""

    preset: str = ""
    """The named preset this config started from (informational; see `preset()`)."""
    family: str = "decoder"
    """'decoder' (GPT-style), 'encoder' (BERT-style) or 'encoder_decoder' (T5-style)."""
    vocab_size: int = 512
    d_model: int = 64
    num_layers: int = 2
    """Decoder-only and encoder-only depth; the encoder depth of an encoder-decoder."""
    num_decoder_layers: Optional[int] = None
    """Decoder depth of an encoder-decoder (defaults to num_layers)."""
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    """Fewer K/V heads than query heads gives GQA (1 gives MQA); None means num_heads."""
    head_dim: Optional[int] = None
    """None means d_model // num_heads."""
    d_ff: int = 256
    max_len: int = 128
    """Longest sequence the position table covers (learned/sinusoidal) and generation allows."""
    position: str = "learned"
    """'learned', 'sinusoidal', 'rope', 'relative' (T5 bias) or 'none'."""
    rope_theta: float = 10000.0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm: str = "layernorm"
    """'layernorm' or 'rmsnorm'."""
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    """'pre' (GPT-2, T5, Llama) or 'post' (original BERT)."""
    embedding_norm: bool = False
    """Normalise the summed embeddings before the first block (BERT)."""
    mlp: str = "gelu"
    """'gelu', 'gelu_exact', 'relu', 'swiglu' or 'geglu' (T5 v1.1 gated GELU)."""
    use_bias: bool = True
    tie_embeddings: bool = True
    scale_tied_logits: bool = False
    """Multiply the decoder output by d_model**-0.5 before a tied head (T5 v1.0)."""
    scale_attention: bool = True
    """Divide attention logits by sqrt(head_dim); T5 folds that scale into its init instead."""
    type_vocab_size: int = 0
    """Token-type (segment A/B) embeddings for BERT; 0 disables them."""
    num_labels: int = 2
    """Classes of the pooled classification head (encoder-only)."""
    pooling: str = "first"
    """What the classifier reads: 'first' token through BERT's tanh pooler, or the 'mean' of
    the real tokens' hidden states (learns faster from a briefly pretrained encoder)."""
    dropout_rate: float = 0.0
    sliding_window: Optional[int] = None
    attention_impl: str = "auto"
    """'auto' (the backend's fastest correct kernel), 'plain', 'chunked' (memory-efficient),
    'cudnn' (NVIDIA GPUs) or 'splash' (TPU Pallas kernel)."""
    dtype: str = "float32"
    """Computation dtype ('float32' or 'bfloat16'); parameters keep param_dtype."""
    param_dtype: str = "float32"
    remat: str = "none"
    """Rematerialise each block in the backward pass: 'none', 'full', 'dots_saveable' or
    'offload_dots' (dots_saveable with the saved matmuls in host memory; TPU/GPU only)."""
    scan_layers: bool = True
    """Run the stacked blocks with jax.lax.scan (compile time flat in depth); False unrolls a
    Python loop over the same parameters, for debugging."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            check_choice(f"ModelConfig.{name}", getattr(self, name), choices)
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly or change one of them"
            )
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}: "
                "each K/V head must serve the same number of query heads"
            )
        if self.position == "rope" and self.dims_per_head % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.dims_per_head}")

    def check_length(self, length: int, key: str) -> None:
        """ValueError naming `key` if a sequence of `length` positions overflows the position
        table (learned/sinusoidal positions; the other kinds have no table)."""
        if self.position in TABLE_POSITIONS and length > self.max_len:
            raise ValueError(
                f"{key}={length} exceeds model.max_len={self.max_len} (the {self.position} "
                f"position table); set {key}=<={self.max_len} or model.max_len={length}"
            )

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads after defaulting."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dims_per_head(self) -> int:
        """Size of one attention head after defaulting."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        """Decoder depth of an encoder-decoder."""
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers


_GPT2 = dict(
    family="decoder",
    vocab_size=50257,
    max_len=1024,
    position="learned",
    norm="layernorm",
    mlp="gelu",
    use_bias=True,
    tie_embeddings=True,
)
_BERT = dict(
    family="encoder",
    vocab_size=30522,
    max_len=512,
    position="learned",
    norm="layernorm",
    norm_eps=1e-12,
    norm_position="post",
    embedding_norm=True,
    mlp="gelu_exact",
    use_bias=True,
    tie_embeddings=True,
    type_vocab_size=2,
)
_T5 = dict(
    family="encoder_decoder",
    vocab_size=32128,
    max_len=512,
    position="relative",
    norm="rmsnorm",
    norm_eps=1e-6,
    mlp="relu",
    use_bias=False,
    tie_embeddings=True,
    scale_tied_logits=True,
    scale_attention=False,
    head_dim=64,
)
_LLAMA = dict(
    family="decoder", position="rope", norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", use_bias=False
)

PRESETS: dict[str, ModelConfig] = {
    # Test-sized models: a few thousand parameters per layer, fast to compile on a CPU.
    "gpt-tiny": ModelConfig(
        **{**_GPT2, "vocab_size": 512, "max_len": 128},
        d_model=64,
        num_layers=2,
        num_heads=4,
        d_ff=256,
    ),
    "bert-tiny": ModelConfig(
        **{**_BERT, "vocab_size": 512, "max_len": 128},
        d_model=64,
        num_layers=2,
        num_heads=4,
        d_ff=256,
    ),
    "t5-tiny": ModelConfig(
        **{**_T5, "vocab_size": 512, "max_len": 128, "head_dim": 16},
        d_model=64,
        num_layers=2,
        num_heads=4,
        d_ff=256,
    ),
    "llama-tiny": ModelConfig(
        **_LLAMA,
        vocab_size=512,
        max_len=128,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        d_ff=192,
    ),
    # Published shapes; the parameter count is in the name.
    "gpt2-124m": ModelConfig(**_GPT2, d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "gpt2-350m": ModelConfig(**_GPT2, d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
    "bert-base": ModelConfig(**_BERT, d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "t5-small": ModelConfig(**_T5, d_model=512, num_layers=6, num_heads=8, d_ff=2048),
    "t5-base": ModelConfig(**_T5, d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    # A Llama-3.2-1B-shaped decoder: RoPE, RMSNorm, SwiGLU, GQA (32 query heads, 8 K/V heads).
    "llama-1b": ModelConfig(
        **_LLAMA,
        vocab_size=128256,
        max_len=8192,
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        d_ff=8192,
        tie_embeddings=True,
        rope_theta=500000.0,
    ),
    # A Llama-3-8B-shaped decoder: 32 layers, 32 query / 8 K/V heads, untied 128k vocabulary.
    "llama3-8b": ModelConfig(
        **_LLAMA,
        vocab_size=128256,
        max_len=8192,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        d_ff=14336,
        tie_embeddings=False,
        rope_theta=500000.0,
    ),
}

# Parameter counts the preset names promise (the published figures).
PROMISED_PARAMS = {
    "gpt2-124m": 124e6,
    "gpt2-350m": 350e6,
    "bert-base": 110e6,
    "t5-small": 60e6,
    "t5-base": 220e6,
    "llama-1b": 1.24e9,
    "llama3-8b": 8.03e9,
}


def preset(name: str) -> ModelConfig:
    """Returns the named ModelConfig; an unknown name lists the valid ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model preset {name!r}.{hint} Valid presets: {', '.join(PRESETS)}"
        )
    return dataclasses.replace(PRESETS[name], preset=name)
