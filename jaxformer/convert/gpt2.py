"""GPT-2 (`GPT2LMHeadModel`) <-> jaxformer DecoderLM.

GPT-2's Conv1D weights are stored [in, out], like our kernels; the fused c_attn [D, 3D] holds
query, key and value side by side along the output axis. gelu_new is our tanh 'gelu'.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxformer.convert.common import (
    Rule,
    check_representable,
    pick,
    same,
    strip_prefix,
    unsupported,
)
from jaxformer.models.config import ModelConfig

NAME = "GPT-2"
ARCHITECTURES = {"causal_lm": "GPT2LMHeadModel"}
OPTIONAL: tuple[str, ...] = ()
# Old checkpoints carry the causal-mask buffers; they hold no parameters.
IGNORED = (r"h\.\d+\.attn\.(masked_)?bias",)

_ACTIVATIONS = {
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_fast": "gelu",
    "gelu": "gelu_exact",
    "relu": "relu",
}
_BACK = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
_QKV = ("query", "key", "value")


def normalize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips 'transformer.', drops a tied lm_head copy, splits c_attn into q/k/v pseudo-weights."""
    weights = strip_prefix(weights, "transformer.")
    if same(weights.get("lm_head.weight"), weights.get("wte.weight")):
        weights.pop("lm_head.weight")
    out = {}
    for k, v in weights.items():
        if k.endswith("attn.c_attn.weight") or k.endswith("attn.c_attn.bias"):
            base, kind = k.rsplit(".c_attn.", 1)
            for name, part in zip(_QKV, np.split(v, 3, axis=-1)):
                out[f"{base}.{name}.{kind}"] = part
        else:
            out[k] = v
    return out


def config_from_hf(c: Any, weights: dict[str, np.ndarray]) -> ModelConfig:
    """Our ModelConfig for a GPT2Config; options we cannot compute raise."""
    for option in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if getattr(c, option, False):
            raise unsupported(NAME, option, True)
    tied = "lm_head.weight" not in weights
    return ModelConfig(
        family="decoder",
        vocab_size=c.vocab_size,
        d_model=c.n_embd,
        num_layers=c.n_layer,
        num_heads=c.n_head,
        d_ff=c.n_inner or 4 * c.n_embd,
        max_len=c.n_positions,
        position="learned",
        norm="layernorm",
        norm_eps=c.layer_norm_epsilon,
        norm_position="pre",
        mlp=pick(_ACTIVATIONS, NAME, "activation_function", c.activation_function),
        use_bias=True,
        tie_embeddings=tied,
        scale_attention=bool(c.scale_attn_weights),
        dropout_rate=float(c.resid_pdrop),
        init_std=float(c.initializer_range),
    )


def rules(cfg: ModelConfig) -> list[Rule]:
    """Weight correspondences (HF names after `normalize`)."""
    out = [
        Rule("wte.weight", "embed.token_embed.embedding"),
        Rule("wpe.weight", "embed.position_embed.embedding"),
        Rule("ln_f.weight", "final_norm.scale"),
        Rule("ln_f.bias", "final_norm.bias"),
    ]
    for i in range(cfg.num_layers):
        h, b = f"h.{i}", f"blocks.{i}"
        for hf, ours in (("ln_1", "self_attn_norm"), ("ln_2", "mlp_norm")):
            out += [
                Rule(f"{h}.{hf}.weight", f"{b}.{ours}.scale"),
                Rule(f"{h}.{hf}.bias", f"{b}.{ours}.bias"),
            ]
        linears = [(f"attn.{n}", f"self_attn.{n}") for n in _QKV] + [
            ("attn.c_proj", "self_attn.out"),
            ("mlp.c_fc", "mlp.up"),
            ("mlp.c_proj", "mlp.down"),
        ]
        for hf, ours in linears:
            out += [
                Rule(f"{h}.{hf}.weight", f"{b}.{ours}.kernel"),
                Rule(f"{h}.{hf}.bias", f"{b}.{ours}.bias"),
            ]
    if not cfg.tie_embeddings:
        out.append(Rule("lm_head.weight", "head.proj.kernel", transpose=True))
    return out


def check(cfg: ModelConfig) -> None:
    """Raises unless a GPT-2 checkpoint can express this config."""
    check_representable(
        cfg,
        NAME,
        family="decoder",
        position="learned",
        norm="layernorm",
        norm_position="pre",
        embedding_norm=False,
        use_bias=True,
        kv_heads=cfg.num_heads,
        dims_per_head=cfg.d_model // cfg.num_heads,
        type_vocab_size=0,
        sliding_window=None,
    )
    if cfg.d_model % cfg.num_heads:
        raise ValueError(
            f"this model cannot be written as a GPT-2 checkpoint: d_model="
            f"{cfg.d_model} is not divisible by num_heads={cfg.num_heads}"
        )
    if cfg.mlp not in _BACK:
        raise ValueError(
            f"this model cannot be written as a GPT-2 checkpoint: ModelConfig.mlp="
            f"{cfg.mlp!r} (GPT-2 supports {', '.join(_BACK)})"
        )
    if cfg.tie_embeddings and cfg.scale_tied_logits:
        raise ValueError(
            "this model cannot be written as a GPT-2 checkpoint: ModelConfig.scale_tied_logits=True"
        )


def finish_export(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Fuses q/k/v back into c_attn and adds the 'transformer.' prefix."""
    out = {}
    for k, v in weights.items():
        if k.endswith("attn.query.weight") or k.endswith("attn.query.bias"):
            base, kind = k.rsplit(".query.", 1)
            out[f"transformer.{base}.c_attn.{kind}"] = np.concatenate(
                [weights[f"{base}.{n}.{kind}"] for n in _QKV], axis=-1
            )
        elif ".attn.key." in k or ".attn.value." in k:
            continue
        else:
            out[k if k.startswith("lm_head.") else f"transformer.{k}"] = v
    return out


def config_to_hf(cfg: ModelConfig, head: str) -> Any:
    """A GPT2Config for our config."""
    import transformers

    special = min(50256, cfg.vocab_size - 1)
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_len,
        n_embd=cfg.d_model,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.d_ff,
        activation_function=_BACK[cfg.mlp],
        layer_norm_epsilon=cfg.norm_eps,
        scale_attn_weights=cfg.scale_attention,
        tie_word_embeddings=cfg.tie_embeddings,
        resid_pdrop=cfg.dropout_rate,
        embd_pdrop=cfg.dropout_rate,
        attn_pdrop=cfg.dropout_rate,
        initializer_range=cfg.init_std,
        bos_token_id=special,
        eos_token_id=special,
    )
