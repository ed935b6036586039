"""Llama-like decoders (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 2) <-> jaxformer DecoderLM.

The five share one weight layout (model.embed_tokens, model.layers.i.self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, per-layer RMSNorms, model.norm, lm_head); what differs is a row of
`FLAVOURS`: the config class, the ModelConfig options the architecture always has, how it records
biases and attention windows. HF linear weights are [out, in], ours their transposes; HF's RoPE
rotates halves, as ours does, so q/k need no permutation. Each flavour offers the interface the
converter registry expects of a converter module (NAME, normalize, config_from_hf, rules, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxformer.convert.common import Rule, check_representable, pick, strip_prefix, unsupported
from jaxformer.models.config import ModelConfig

_ACTIVATIONS = {
    "silu": "swiglu",
    "swish": "swiglu",
    "gelu_pytorch_tanh": "geglu",
    "gelu_new": "geglu",
}
_BACK = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}
# HF rope_type -> ModelConfig.rope_scaling ("default" is plain RoPE).
_ROPE = {"default": "none", "linear": "linear", "llama3": "llama3"}
_ROPE_BACK = {v: k for k, v in _ROPE.items()}
_SLIDING, _FULL = "sliding_attention", "full_attention"
# ModelConfig field -> HF config attribute, for the Gemma 2 options read and written as they are.
_GEMMA_SCALARS = (
    ("attn_logit_softcap", "attn_logit_softcapping"),
    ("final_logit_softcap", "final_logit_softcapping"),
    ("query_pre_attn_scalar", "query_pre_attn_scalar"),
)


@dataclasses.dataclass(frozen=True)
class Flavour:
    """One Hugging Face model type of the family: its classes and what its config can express."""

    model_type: str
    NAME: str
    config_class: str
    architecture: str
    fixed: tuple[tuple[str, Any], ...]
    """ModelConfig options every checkpoint of this type has (beyond the family's defaults)."""
    biases: str
    """'llama' (attention_bias on q/k/v/o, mlp_bias on the MLP), 'attention' (attention_bias on
    q/k/v/o, none on the MLP: only False is representable) or 'fixed' (set by `fixed`)."""
    windows: str
    """'none' (full attention), 'all' (sliding_window on every layer) or 'layer_types'."""
    head_dim: str
    """'free' (a head_dim option), 'divisible' (head_dim option, but the config class requires
    hidden_size % num_attention_heads == 0) or 'derived' (always hidden_size // heads)."""
    activation_key: str = "hidden_act"
    gemma: bool = False
    """Whether the type has Gemma 2's scalars (`_GEMMA_SCALARS`)."""

    OPTIONAL: tuple[str, ...] = ()
    # A tied lm_head copy (tying follows the config, as in transformers) and old RoPE buffers.
    IGNORED: tuple[str, ...] = (r"lm_head\.weight", r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

    @property
    def ARCHITECTURES(self) -> dict[str, str]:  # noqa: N802 (the converter-module interface)
        """The head names to_hf accepts and the class each records."""
        return {"causal_lm": self.architecture}

    # ------------------------------------------------------------------------- reading

    def normalize(self, weights: dict[str, Any]) -> dict[str, Any]:
        """Strips the 'model.' prefix of the causal-LM class (names only; values untouched)."""
        return strip_prefix(weights, "model.")

    def config_from_hf(self, c: Any, weights: dict[str, Any]) -> ModelConfig:
        """Our ModelConfig for this type's HF config; options we cannot compute raise."""
        del weights  # tying follows tie_word_embeddings, as transformers does
        heads, hidden = c.num_attention_heads, c.hidden_size
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        if getattr(c, "use_bidirectional_attention", False):
            raise unsupported(self.NAME, "use_bidirectional_attention", True, "causal only")
        act = getattr(c, self.activation_key)
        kw: dict[str, Any] = dict(
            family="decoder",
            vocab_size=c.vocab_size,
            d_model=hidden,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=None if kv == heads else kv,
            head_dim=None if head_dim * heads == hidden else head_dim,
            d_ff=c.intermediate_size,
            max_len=c.max_position_embeddings,
            position="rope",
            norm="rmsnorm",
            norm_eps=float(c.rms_norm_eps),
            norm_position="pre",
            mlp=pick(_ACTIVATIONS, self.NAME, self.activation_key, act),
            use_bias=False,
            tie_embeddings=bool(c.tie_word_embeddings),
            init_std=float(c.initializer_range),
        )
        kw.update(self.fixed)
        kw.update(self._biases_from_hf(c))
        kw.update(_rope_from_hf(self.NAME, c))
        kw.update(self._windows_from_hf(c))
        kw.update(self._scalars_from_hf(c))
        return ModelConfig(**kw)

    def _biases_from_hf(self, c: Any) -> dict[str, Any]:
        if self.biases == "fixed":
            return {}
        attention = bool(getattr(c, "attention_bias", False))
        mlp = bool(getattr(c, "mlp_bias", False)) if self.biases == "llama" else False
        if attention != mlp:
            raise unsupported(
                self.NAME,
                "attention_bias",
                attention,
                f"with mlp_bias={mlp}: jaxformer biases either every projection "
                "(ModelConfig.use_bias) or only q/k/v (ModelConfig.qkv_bias)",
            )
        return dict(use_bias=attention) if attention else {}

    def _windows_from_hf(self, c: Any) -> dict[str, Any]:
        window = getattr(c, "sliding_window", None)
        if self.windows == "none" or window is None:
            return {}
        if self.windows == "all":
            return dict(sliding_window=int(window))
        types = getattr(c, "layer_types", None)
        if types is None:  # transformers 4.x: each model type had its own implicit pattern
            raise unsupported(
                self.NAME,
                "sliding_window",
                window,
                "without layer_types, which transformers >= 5 records; upgrade transformers",
            )
        types = list(types)
        if len(types) != c.num_hidden_layers or set(types) - {_SLIDING, _FULL}:
            raise unsupported(
                self.NAME, "layer_types", types, f"only {_SLIDING!r}/{_FULL!r}, one per layer"
            )
        sliding = [t == _SLIDING for t in types]
        if not any(sliding):
            return {}
        if all(sliding):
            return dict(sliding_window=int(window))
        every = sliding.index(False) + 1
        if sliding != [(i + 1) % every != 0 for i in range(len(types))]:
            raise unsupported(
                self.NAME,
                "layer_types",
                types,
                "jaxformer's windowed models attend globally on every n-th layer only "
                "(ModelConfig.global_attention_every); for Qwen see use_sliding_window and "
                "max_window_layers",
            )
        return dict(sliding_window=int(window), global_attention_every=every)

    def _scalars_from_hf(self, c: Any) -> dict[str, Any]:
        if not self.gemma:
            return {}
        out = {}
        for ours, theirs in _GEMMA_SCALARS:
            value = getattr(c, theirs, None)
            out[ours] = None if value is None else float(value)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if out["query_pre_attn_scalar"] == head_dim:  # the usual head_dim**-0.5
            out["query_pre_attn_scalar"] = None
        return out

    def rules(self, cfg: ModelConfig) -> list[Rule]:
        """Weight correspondences (HF names after `normalize`); which ones exist follows `cfg`."""
        qkv_bias = cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias
        out = [
            Rule("embed_tokens.weight", "embed.token_embed.embedding"),
            Rule("norm.weight", "final_norm.scale"),
        ]
        norms = (
            (
                ("input_layernorm", "self_attn_norm"),
                ("post_attention_layernorm", "post_self_attn_norm"),
                ("pre_feedforward_layernorm", "mlp_norm"),
                ("post_feedforward_layernorm", "post_mlp_norm"),
            )
            if cfg.post_norms
            else (("input_layernorm", "self_attn_norm"), ("post_attention_layernorm", "mlp_norm"))
        )
        linears = (
            ("self_attn.q_proj", "self_attn.query", qkv_bias),
            ("self_attn.k_proj", "self_attn.key", qkv_bias),
            ("self_attn.v_proj", "self_attn.value", qkv_bias),
            ("self_attn.o_proj", "self_attn.out", cfg.use_bias),
            ("mlp.gate_proj", "mlp.gate", cfg.use_bias),
            ("mlp.up_proj", "mlp.up", cfg.use_bias),
            ("mlp.down_proj", "mlp.down", cfg.use_bias),
        )
        for i in range(cfg.num_layers):
            h, b = f"layers.{i}", f"blocks.{i}"
            out += [Rule(f"{h}.{hf}.weight", f"{b}.{ours}.scale") for hf, ours in norms]
            if cfg.qk_norm:
                out += [
                    Rule(f"{h}.self_attn.q_norm.weight", f"{b}.self_attn.query_norm.scale"),
                    Rule(f"{h}.self_attn.k_norm.weight", f"{b}.self_attn.key_norm.scale"),
                ]
            for hf, ours, bias in linears:
                out.append(Rule(f"{h}.{hf}.weight", f"{b}.{ours}.kernel", transpose=True))
                if bias:
                    out.append(Rule(f"{h}.{hf}.bias", f"{b}.{ours}.bias"))
        if not cfg.tie_embeddings:
            out.append(Rule("lm_head.weight", "head.proj.kernel", transpose=True))
        return out

    # ------------------------------------------------------------------------- writing

    def check(self, cfg: ModelConfig) -> None:
        """Raises, naming every ModelConfig field at fault, unless this type can express `cfg`."""
        no_bias = _OneOf((None, False))
        expected: dict[str, Any] = dict(
            family="decoder",
            position="rope",
            norm="rmsnorm",
            norm_position="pre",
            embedding_norm=False,
            type_vocab_size=0,
            scale_attention=True,
            scale_tied_logits=False,
            mlp=_OneOf(_BACK),
            rope_scaling=_OneOf(_ROPE_BACK),
            qk_norm=False,
            post_norms=False,
            norm_unit_offset=False,
            embed_scale=False,
            # Biases: all projections or none (Llama), or none but the fixed ones.
            qkv_bias=_OneOf((None, cfg.use_bias)) if self.biases == "llama" else no_bias,
        )
        if self.biases != "llama":
            expected["use_bias"] = False
        if not self.gemma:
            expected.update(
                attn_logit_softcap=None,
                final_logit_softcap=None,
                query_pre_attn_scalar=_OneOf((None, cfg.dims_per_head)),
            )
        if self.windows == "none":
            expected.update(sliding_window=None, global_attention_every=None)
        elif self.windows == "all":
            expected["global_attention_every"] = None
        if self.head_dim == "derived":
            expected["head_dim"] = _OneOf((None, cfg.d_model // cfg.num_heads))
        check_representable(cfg, self.NAME, **{**expected, **dict(self.fixed)})
        needs = []  # what the HF config class itself validates
        if self.head_dim != "free" and cfg.d_model % cfg.num_heads:
            needs.append(
                f"ModelConfig.d_model={cfg.d_model} divisible by "
                f"ModelConfig.num_heads={cfg.num_heads}"
            )
        scalar = cfg.query_pre_attn_scalar
        if self.gemma and scalar is not None and not float(scalar).is_integer():
            needs.append(f"a whole ModelConfig.query_pre_attn_scalar, not {scalar!r}")
        if needs:
            raise ValueError(
                f"this model cannot be written as a {self.NAME} checkpoint: its config class "
                f"needs {' and '.join(needs)}"
            )

    def finish_export(self, weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
        """Adds the 'model.' prefix of the causal-LM class."""
        return {k if k.startswith("lm_head.") else f"model.{k}": v for k, v in weights.items()}

    def config_to_hf(self, cfg: ModelConfig, head: str) -> Any:
        """This type's transformers config for `cfg` (after `check`)."""
        import transformers

        config_class = getattr(transformers, self.config_class, None)
        if config_class is None:
            raise ValueError(
                f"transformers {transformers.__version__} has no {self.config_class}; "
                f"upgrade transformers to write a {self.NAME} checkpoint"
            )
        kw: dict[str, Any] = dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_len,
            rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            initializer_range=cfg.init_std,
            **{self.activation_key: _BACK[cfg.mlp]},
            **_rope_to_hf(cfg),
            **self._windows_to_hf(cfg),
        )
        if self.head_dim != "derived":
            kw["head_dim"] = cfg.dims_per_head
        if self.biases == "llama":
            kw.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
        elif self.biases == "attention":
            kw["attention_bias"] = False
        if self.gemma:
            kw.update({theirs: getattr(cfg, ours) for ours, theirs in _GEMMA_SCALARS})
            # An int in Gemma2Config; None means the usual head_dim**-0.5.
            kw["query_pre_attn_scalar"] = int(cfg.query_pre_attn_scalar or cfg.dims_per_head)
        try:
            return config_class(**kw)
        except Exception as e:  # transformers' own validation (huggingface_hub strict dataclasses)
            raise ValueError(
                f"this model cannot be written as a {self.NAME} checkpoint: transformers' "
                f"{self.config_class} refuses its settings: {e}"
            ) from e

    def _windows_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        if self.windows == "none":
            return {}
        if self.windows == "all":
            return dict(sliding_window=cfg.sliding_window)
        types = layer_types(cfg)
        # Qwen's config nulls sliding_window unless use_sliding_window; Gemma 2's always builds
        # the sliding mask, so its window must be a number even where no layer uses it.
        out: dict[str, Any] = dict(
            layer_types=types, sliding_window=cfg.sliding_window or cfg.max_len
        )
        if not self.gemma:
            out.update(use_sliding_window=_SLIDING in types, max_window_layers=0)
        return out


def plain_options(cfg: ModelConfig) -> dict[str, Any]:
    """For check_representable: the values of this family's options under which a model is one
    that GPT-2, BERT or T5 checkpoints (which have none of them) can express."""
    return dict(
        qkv_bias=_OneOf((None, cfg.use_bias)),
        qk_norm=False,
        post_norms=False,
        norm_unit_offset=False,
        embed_scale=False,
        attn_logit_softcap=None,
        final_logit_softcap=None,
        query_pre_attn_scalar=_OneOf((None, cfg.dims_per_head)),
        global_attention_every=None,
        rope_scaling="none",
    )


def layer_types(cfg: ModelConfig) -> list[str]:
    """HF's per-layer attention kinds of `cfg`: sliding everywhere but each n-th (global) layer."""
    every = cfg.global_attention_every
    return [
        _SLIDING
        if cfg.sliding_window is not None and (every is None or (i + 1) % every != 0)
        else _FULL
        for i in range(cfg.num_layers)
    ]


class _OneOf(tuple):
    """Values a field may take, for check_representable: equal to each, named as 'a' or 'b'."""

    def __eq__(self, other: object) -> bool:
        return other in tuple(self)

    def __ne__(self, other: object) -> bool:
        return other not in tuple(self)

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return " or ".join(map(repr, self))


def _rope_parameters(c: Any) -> dict[str, Any]:
    """The HF config's RoPE settings as one dict (transformers 5's rope_parameters; 4.x's
    rope_theta + rope_scaling)."""
    params = getattr(c, "rope_parameters", None)
    if params is None:
        scaling = getattr(c, "rope_scaling", None) or {}
        return {"rope_theta": getattr(c, "rope_theta", 10000.0), **scaling}
    return dict(params)


def _rope_from_hf(name: str, c: Any) -> dict[str, Any]:
    params = _rope_parameters(c)
    if params and all(isinstance(v, dict) for v in params.values()):  # one per layer type
        kinds = list(params.values())
        if any(p != kinds[0] for p in kinds):
            raise unsupported(name, "rope_parameters", params, "one RoPE for every layer only")
        params = dict(kinds[0])
    partial = params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise unsupported(name, "partial_rotary_factor", partial, "RoPE over whole heads only")
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = pick(_ROPE, name, "rope_parameters.rope_type", kind)
    out: dict[str, Any] = dict(rope_theta=float(params.get("rope_theta", 10000.0)))
    if scaling != "none":
        out.update(rope_scaling=scaling, rope_scaling_factor=float(params["factor"]))
    if scaling == "llama3":
        out.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(params["original_max_position_embeddings"]),
        )
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    import transformers

    params: dict[str, Any] = {
        "rope_type": _ROPE_BACK[cfg.rope_scaling],
        "rope_theta": cfg.rope_theta,
    }
    if cfg.rope_scaling != "none":
        params["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        params.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    if int(transformers.__version__.split(".")[0]) >= 5:
        return dict(rope_parameters=params)
    scaling = None if cfg.rope_scaling == "none" else params
    return dict(rope_theta=cfg.rope_theta, rope_scaling=scaling)


FLAVOURS: dict[str, Flavour] = {
    "llama": Flavour(
        model_type="llama",
        NAME="Llama",
        config_class="LlamaConfig",
        architecture="LlamaForCausalLM",
        fixed=(),
        biases="llama",
        windows="none",
        head_dim="divisible",
    ),
    "mistral": Flavour(
        model_type="mistral",
        NAME="Mistral",
        config_class="MistralConfig",
        architecture="MistralForCausalLM",
        fixed=(),
        biases="fixed",
        windows="all",
        head_dim="free",
    ),
    "qwen2": Flavour(
        model_type="qwen2",
        NAME="Qwen2",
        config_class="Qwen2Config",
        architecture="Qwen2ForCausalLM",
        fixed=(("use_bias", False), ("qkv_bias", True)),
        biases="fixed",
        windows="layer_types",
        head_dim="derived",
    ),
    "qwen3": Flavour(
        model_type="qwen3",
        NAME="Qwen3",
        config_class="Qwen3Config",
        architecture="Qwen3ForCausalLM",
        fixed=(("qk_norm", True),),
        biases="attention",
        windows="layer_types",
        head_dim="free",
    ),
    "gemma2": Flavour(
        model_type="gemma2",
        NAME="Gemma 2",
        config_class="Gemma2Config",
        architecture="Gemma2ForCausalLM",
        fixed=(("post_norms", True), ("norm_unit_offset", True), ("embed_scale", True)),
        biases="attention",
        windows="layer_types",
        head_dim="divisible",
        activation_key="hidden_activation",
        gemma=True,
    ),
}


def select(cfg: ModelConfig) -> str:
    """The model type a RoPE/RMSNorm decoder is written as, chosen by the features it uses."""
    gemma = (
        cfg.post_norms
        or cfg.norm_unit_offset
        or cfg.embed_scale
        or cfg.attn_logit_softcap is not None
        or cfg.final_logit_softcap is not None
        or cfg.query_pre_attn_scalar not in (None, cfg.dims_per_head)
    )
    if gemma:
        return "gemma2"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.use_bias:
        return "qwen2"
    if cfg.sliding_window is not None and cfg.global_attention_every is None:
        return "mistral"
    return "llama"
