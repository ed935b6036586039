"""The frozen model configuration shared by the three families, and the named presets."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Optional

from jaxformer.attention import IMPLEMENTATIONS
from jaxformer.config import check_choice
from jaxformer.layers import ACTIVATIONS, NORMS
from jaxformer.positional import ROPE_SCALINGS, RopeScaling

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
    "rope_scaling": ROPE_SCALINGS,
}

GLOBAL_WINDOW = 2**30
"""The window a global layer gets in a per-layer window table (longer than any sequence)."""


# Sizes that must be at least 1 (None, where allowed, means a default): 0 heads would divide by
# zero, 0 layers would train and fail at the first save.
POSITIVE_SIZES = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "d_ff",
    "max_len",
)


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
    rope_scaling: str = "none"
    """RoPE frequency scaling: 'none', 'linear' (positions / rope_scaling_factor) or 'llama3'
    (Llama 3.1's frequency-dependent scaling; see positional.RopeScaling)."""
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above rope_original_max_len / this are divided by the factor."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below rope_original_max_len / this are kept unscaled."""
    rope_original_max_len: int = 8192
    """llama3: the context length the model was pretrained at."""
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm: str = "layernorm"
    """'layernorm' or 'rmsnorm'."""
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    """'pre' (GPT-2, T5, Llama) or 'post' (original BERT)."""
    embedding_norm: bool = False
    """Normalise the summed embeddings before the first block (BERT)."""
    post_norms: bool = False
    """Also normalise each sub-block's output (self-attention, cross-attention, MLP) before it
    is added to the residual ("sandwich" norms, Gemma 2); needs norm_position='pre'."""
    norm_unit_offset: bool = False
    """Store every norm scale as (scale - 1), zero-initialised, applied as (1 + scale) in float32
    (Gemma)."""
    qk_norm: bool = False
    """Normalise each head's query and key over head_dim (the `norm` kind) before RoPE (Qwen3)."""
    mlp: str = "gelu"
    """'gelu', 'gelu_exact', 'relu', 'swiglu' or 'geglu' (T5 v1.1 gated GELU)."""
    use_bias: bool = True
    qkv_bias: Optional[bool] = None
    """Bias on the query/key/value projections; None means use_bias (Qwen2: use_bias=False,
    qkv_bias=True)."""
    tie_embeddings: bool = True
    scale_tied_logits: bool = False
    """Multiply the decoder output by d_model**-0.5 before a tied head (T5 v1.0)."""
    scale_attention: bool = True
    """Divide attention logits by sqrt(head_dim); T5 folds that scale into its init instead."""
    query_pre_attn_scalar: Optional[float] = None
    """Scale attention logits by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5 (Gemma 2)."""
    attn_logit_softcap: Optional[float] = None
    """Attention logits (scaled, before masking) become cap * tanh(logits / cap) (Gemma 2)."""
    final_logit_softcap: Optional[float] = None
    """Output logits become cap * tanh(logits / cap), in float32 (Gemma 2)."""
    embed_scale: bool = False
    """Multiply token embeddings by sqrt(d_model), cast to the compute dtype first (Gemma)."""
    type_vocab_size: int = 0
    """Token-type (segment A/B) embeddings for BERT; 0 disables them."""
    num_labels: int = 2
    """Classes of the pooled classification head (encoder-only)."""
    pooling: str = "first"
    """What the classifier reads: 'first' token through BERT's tanh pooler, or the 'mean' of
    the real tokens' hidden states (learns faster from a briefly pretrained encoder)."""
    dropout_rate: float = 0.0
    sliding_window: Optional[int] = None
    """Self-attention sees keys less than this many positions away (q - window < k <= q when
    causal); None attends to the whole sequence."""
    global_attention_every: Optional[int] = None
    """With sliding_window: layer i (0-based) attends globally when (i + 1) % this == 0, the
    others use the window (Gemma 2: 2). None: every layer uses sliding_window (Mistral)."""
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
    Python loop over the same parameters: for debugging, and ~20% faster steps for shallow models
    on CPUs (configs/default.yaml). Checkpoints are the same either way."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in POSITIVE_SIZES:  # first: num_heads=0 would divide by zero below
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.{name}={value}: must be >= 1")
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
        self._check_options()

    def _check_options(self) -> None:
        """The checks of the per-family options (soft-caps, norms, windows, RoPE scaling)."""
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0 (or null), got {value}")
        if self.query_pre_attn_scalar is not None and not self.scale_attention:
            raise ValueError(
                "ModelConfig.query_pre_attn_scalar sets the logit scale, which "
                "scale_attention=false turns off; set one of them"
            )
        if self.post_norms and self.norm_position != "pre":
            raise ValueError(
                "ModelConfig.post_norms (sandwich norms) needs norm_position='pre', "
                f"got {self.norm_position!r}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window must be >= 1, got {self.sliding_window}")
        if self.global_attention_every is not None:
            if self.sliding_window is None:
                raise ValueError(
                    "ModelConfig.global_attention_every alternates local (sliding_window) and "
                    "global layers; set sliding_window too"
                )
            if self.global_attention_every < 1:
                raise ValueError(
                    "ModelConfig.global_attention_every must be >= 1, got "
                    f"{self.global_attention_every}"
                )
        if self.rope_scaling != "none":
            if self.position != "rope":
                raise ValueError(
                    f"ModelConfig.rope_scaling={self.rope_scaling!r} needs position='rope', "
                    f"got {self.position!r}"
                )
            try:
                _ = self.rope_scaling_spec
            except ValueError as e:
                raise ValueError(f"ModelConfig.rope_scaling: {e}") from None

    @property
    def rope_scaling_spec(self) -> Optional[RopeScaling]:
        """The RoPE scaling the attention layers take (None for 'none')."""
        if self.rope_scaling == "none":
            return None
        return RopeScaling(
            self.rope_scaling,
            self.rope_scaling_factor,
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_max_len,
        )

    def layer_windows(self, depth: int) -> Optional[tuple[int, ...]]:
        """Each layer's sliding window when global_attention_every sets a pattern (global layers
        get GLOBAL_WINDOW), else None: every layer uses sliding_window as it is."""
        if self.global_attention_every is None or self.sliding_window is None:
            return None
        every = self.global_attention_every
        return tuple(
            GLOBAL_WINDOW if (i + 1) % every == 0 else self.sliding_window for i in range(depth)
        )

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
