"""T5 (`T5ForConditionalGeneration`, v1.0 and v1.1) <-> jaxformer EncoderDecoderLM.

T5 keeps its relative-position bias only in layer 0 of each stack and shares it with the other
layers: our one `encoder_bias` / `decoder_bias` map to those. v1.0 ties the LM head to the shared
embedding and scales the decoder output by d_model**-0.5 first; v1.1 (gated GELU) does not scale
and (in transformers 4.x checkpoints) has its own lm_head.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxformer.convert.common import Rule, check_representable, pick, same, unsupported
from jaxformer.models.config import ModelConfig

NAME = "T5"
ARCHITECTURES = {"seq2seq_lm": "T5ForConditionalGeneration"}
OPTIONAL: tuple[str, ...] = ()
IGNORED = (
    r"(encoder|decoder)\.embed_tokens\.weight",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)

_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu_exact",
    "gelu_new": "gelu",
    "gated-gelu": "geglu",
    "gated-gelu_new": "geglu",
    "gated-silu": "swiglu",
}
_BACK = {
    "relu": "relu",
    "gelu_exact": "gelu",
    "gelu": "gelu_new",
    "geglu": "gated-gelu",
    "swiglu": "gated-silu",
}
MAX_LEN = 512


def normalize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checks that the stacks' embeddings are the shared one (T5 ties them); drops tied copies."""
    weights = dict(weights)
    if same(weights.get("lm_head.weight"), weights.get("shared.weight")):
        weights.pop("lm_head.weight")
    for stack in ("encoder", "decoder"):
        own = weights.get(f"{stack}.embed_tokens.weight")
        if own is not None and not same(own, weights.get("shared.weight")):
            raise unsupported(
                NAME,
                f"{stack}.embed_tokens",
                "untied",
                "jaxformer shares one embedding between encoder and decoder",
            )
    return weights


def config_from_hf(c: Any, weights: dict[str, np.ndarray]) -> ModelConfig:
    """Our ModelConfig for a T5Config; options we cannot compute raise."""
    tied = "lm_head.weight" not in weights
    # transformers >= 5 records the v1.0 output scaling separately; 4.x scales iff tied.
    scaled = bool(getattr(c, "scale_decoder_outputs", c.tie_word_embeddings))
    if scaled and not tied:
        raise unsupported(
            NAME, "lm_head", "untied with scaled decoder outputs", "our untied head never scales"
        )
    if getattr(c, "is_decoder", False):
        raise unsupported(NAME, "is_decoder", True)
    return ModelConfig(
        family="encoder_decoder",
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers,
        num_heads=c.num_heads,
        head_dim=c.d_kv,
        d_ff=c.d_ff,
        max_len=MAX_LEN,
        position="relative",
        relative_buckets=c.relative_attention_num_buckets,
        relative_max_distance=c.relative_attention_max_distance,
        norm="rmsnorm",
        norm_eps=c.layer_norm_epsilon,
        norm_position="pre",
        mlp=pick(_ACTIVATIONS, NAME, "feed_forward_proj", c.feed_forward_proj),
        use_bias=False,
        tie_embeddings=tied,
        scale_tied_logits=scaled and tied,
        scale_attention=False,
        dropout_rate=float(c.dropout_rate),
    )


def rules(cfg: ModelConfig) -> list[Rule]:
    """Weight correspondences."""
    gated = cfg.mlp in ("geglu", "swiglu")

    def attention(hf, ours):
        return [
            Rule(f"{hf}.{a}.weight", f"{ours}.{b}.kernel", True)
            for a, b in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))
        ]

    def mlp(hf, ours):
        names = (("wi_0", "gate"), ("wi_1", "up")) if gated else (("wi", "up"),)
        return [
            Rule(f"{hf}.{a}.weight", f"{ours}.{b}.kernel", True)
            for a, b in names + (("wo", "down"),)
        ]

    out = [
        Rule("shared.weight", "embed.token_embed.embedding"),
        Rule("encoder.final_layer_norm.weight", "encoder_norm.scale"),
        Rule("decoder.final_layer_norm.weight", "decoder_norm.scale"),
    ]
    for stack in ("encoder", "decoder"):
        out.append(
            Rule(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                f"{stack}_bias.embedding",
            )
        )
    for i in range(cfg.num_layers):
        h, b = f"encoder.block.{i}.layer", f"encoder_blocks.{i}"
        out += [
            *attention(f"{h}.0.SelfAttention", f"{b}.self_attn"),
            Rule(f"{h}.0.layer_norm.weight", f"{b}.self_attn_norm.scale"),
            *mlp(f"{h}.1.DenseReluDense", f"{b}.mlp"),
            Rule(f"{h}.1.layer_norm.weight", f"{b}.mlp_norm.scale"),
        ]
    for i in range(cfg.decoder_layers):
        h, b = f"decoder.block.{i}.layer", f"decoder_blocks.{i}"
        out += [
            *attention(f"{h}.0.SelfAttention", f"{b}.self_attn"),
            Rule(f"{h}.0.layer_norm.weight", f"{b}.self_attn_norm.scale"),
            *attention(f"{h}.1.EncDecAttention", f"{b}.cross_attn"),
            Rule(f"{h}.1.layer_norm.weight", f"{b}.cross_attn_norm.scale"),
            *mlp(f"{h}.2.DenseReluDense", f"{b}.mlp"),
            Rule(f"{h}.2.layer_norm.weight", f"{b}.mlp_norm.scale"),
        ]
    if not cfg.tie_embeddings:
        out.append(Rule("lm_head.weight", "head.proj.kernel", transpose=True))
    return out


def check(cfg: ModelConfig) -> None:
    """Raises unless a T5 checkpoint can express this config."""
    check_representable(
        cfg,
        NAME,
        family="encoder_decoder",
        position="relative",
        norm="rmsnorm",
        norm_position="pre",
        embedding_norm=False,
        use_bias=False,
        scale_attention=False,
        kv_heads=cfg.num_heads,
        type_vocab_size=0,
        sliding_window=None,
    )
    if cfg.mlp not in _BACK:
        raise ValueError(
            f"this model cannot be written as a T5 checkpoint: ModelConfig.mlp="
            f"{cfg.mlp!r} (T5 supports {', '.join(_BACK)})"
        )


def finish_export(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Writes an explicit lm_head whenever the output is not scaled.

    transformers 5 ties T5's head to the shared embedding unless the file holds a different
    lm_head; 4.x unties it when tie_word_embeddings is False. An explicit head reads right in both.
    """
    if "lm_head.weight" not in weights and not cfg.scale_tied_logits:
        weights = {**weights, "lm_head.weight": weights["shared.weight"]}
    return weights


def config_to_hf(cfg: ModelConfig, head: str) -> Any:
    """A T5Config for our config (tie_word_embeddings carries the v1.0 output scaling)."""
    import transformers

    scaled = cfg.tie_embeddings and cfg.scale_tied_logits
    return transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.dims_per_head,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout_rate,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj=_BACK[cfg.mlp],
        tie_word_embeddings=scaled,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
