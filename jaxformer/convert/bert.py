"""BERT (`BertForMaskedLM`, `BertForSequenceClassification`, `BertForTokenClassification`,
`BertForQuestionAnswering`) <-> jaxformer EncoderLM.

Our EncoderLM has both heads: the masked-LM head (transform dense + activation + LayerNorm, tied
decoder, bias) and the tanh pooler + classifier. Reading maps whichever heads the checkpoint has
and keeps our initialisation for the rest; writing stores both, so either HF class loads it.
The token-classification head is the same `classifier` applied to every token, and the QA
head's `qa_outputs` is that classifier with two labels (start, end): reading renames
`qa_outputs` to `classifier`, and a question-answering export (`weights_for_head`) back.
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

NAME = "BERT"
ARCHITECTURES = {
    "masked_lm": "BertForMaskedLM",
    "classification": "BertForSequenceClassification",
    "token_classification": "BertForTokenClassification",
    "question_answering": "BertForQuestionAnswering",
}
_QA, _CLASSIFIER = "qa_outputs.", "classifier."
OPTIONAL = ("mlm_", "pooler.", "classifier.")
IGNORED = (
    r"embeddings\.position_ids",
    r"embeddings\.token_type_ids",
    r"cls\.predictions\.decoder\.bias",
)

_ACTIVATIONS = {
    "gelu": "gelu_exact",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "relu": "relu",
}
_BACK = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}
_BASE = ("embeddings.", "encoder.", "pooler.")


def normalize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips the 'bert.' prefix of headed models, drops a tied decoder copy and reads a QA
    head's `qa_outputs` as our classifier (two labels: start, end)."""
    weights = strip_prefix(weights, "bert.")
    if any(k.startswith(_QA) for k in weights):
        if any(k.startswith(_CLASSIFIER) for k in weights):
            raise ValueError("BERT weights hold both qa_outputs and classifier heads")
        weights = {
            (_CLASSIFIER + k[len(_QA) :] if k.startswith(_QA) else k): v for k, v in weights.items()
        }
    if same(
        weights.get("cls.predictions.decoder.weight"),
        weights.get("embeddings.word_embeddings.weight"),
    ):
        weights.pop("cls.predictions.decoder.weight")
    return weights


def config_from_hf(c: Any, weights: dict[str, np.ndarray]) -> ModelConfig:
    """Our ModelConfig for a BertConfig; options we cannot compute raise."""
    position = getattr(c, "position_embedding_type", "absolute")
    if position != "absolute":
        raise unsupported(NAME, "position_embedding_type", position, "only 'absolute'")
    for option in ("is_decoder", "add_cross_attention"):
        if getattr(c, option, False):
            raise unsupported(NAME, option, True)
    if "cls.predictions.bias" in weights:  # a masked-LM head: tied unless it has its own decoder
        tied = "cls.predictions.decoder.weight" not in weights
    else:
        tied = bool(getattr(c, "tie_word_embeddings", True))
    classifier = weights.get("classifier.weight")
    return ModelConfig(
        family="encoder",
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        d_ff=c.intermediate_size,
        max_len=c.max_position_embeddings,
        position="learned",
        norm="layernorm",
        norm_eps=c.layer_norm_eps,
        norm_position="post",
        embedding_norm=True,
        mlp=pick(_ACTIVATIONS, NAME, "hidden_act", c.hidden_act),
        use_bias=True,
        tie_embeddings=bool(tied),
        type_vocab_size=c.type_vocab_size,
        num_labels=int(classifier.shape[0]) if classifier is not None else int(c.num_labels),
        dropout_rate=float(c.hidden_dropout_prob),
        init_std=float(c.initializer_range),
    )


def rules(cfg: ModelConfig) -> list[Rule]:
    """Weight correspondences (HF names without the 'bert.' prefix)."""

    def linear(hf, ours):
        return [Rule(f"{hf}.weight", f"{ours}.kernel", True), Rule(f"{hf}.bias", f"{ours}.bias")]

    def norm(hf, ours):
        return [Rule(f"{hf}.weight", f"{ours}.scale"), Rule(f"{hf}.bias", f"{ours}.bias")]

    e = "embeddings"
    out = [
        Rule(f"{e}.word_embeddings.weight", "embed.token_embed.embedding"),
        Rule(f"{e}.position_embeddings.weight", "embed.position_embed.embedding"),
        Rule(f"{e}.token_type_embeddings.weight", "embed.type_embed.embedding"),
        *norm(f"{e}.LayerNorm", "embed.norm"),
    ]
    for i in range(cfg.num_layers):
        h, b = f"encoder.layer.{i}", f"blocks.{i}"
        for n in ("query", "key", "value"):
            out += linear(f"{h}.attention.self.{n}", f"{b}.self_attn.{n}")
        out += [
            *linear(f"{h}.attention.output.dense", f"{b}.self_attn.out"),
            *norm(f"{h}.attention.output.LayerNorm", f"{b}.self_attn_norm"),
            *linear(f"{h}.intermediate.dense", f"{b}.mlp.up"),
            *linear(f"{h}.output.dense", f"{b}.mlp.down"),
            *norm(f"{h}.output.LayerNorm", f"{b}.mlp_norm"),
        ]
    out += [
        *linear("cls.predictions.transform.dense", "mlm_dense"),
        *norm("cls.predictions.transform.LayerNorm", "mlm_norm"),
        Rule("cls.predictions.bias", "mlm_bias"),
        *linear("pooler.dense", "pooler"),
        *linear("classifier", "classifier"),
    ]
    if not cfg.tie_embeddings:
        out.append(Rule("cls.predictions.decoder.weight", "mlm_out.kernel", transpose=True))
    return out


def check(cfg: ModelConfig) -> None:
    """Raises unless a BERT checkpoint can express this config."""
    check_representable(
        cfg,
        NAME,
        family="encoder",
        position="learned",
        norm="layernorm",
        norm_position="post",
        embedding_norm=True,
        use_bias=True,
        kv_heads=cfg.num_heads,
        dims_per_head=cfg.d_model // cfg.num_heads,
        sliding_window=None,
    )
    if cfg.d_model % cfg.num_heads or cfg.type_vocab_size < 1 or cfg.mlp not in _BACK:
        raise ValueError(
            "this model cannot be written as a BERT checkpoint: it needs d_model divisible by "
            f"num_heads, type_vocab_size >= 1 and mlp in {', '.join(_BACK)}; got d_model="
            f"{cfg.d_model}, num_heads={cfg.num_heads}, type_vocab_size={cfg.type_vocab_size}, "
            f"mlp={cfg.mlp!r}"
        )


def finish_export(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Adds the 'bert.' prefix and the decoder bias (an alias of cls.predictions.bias)."""
    out = {f"bert.{k}" if k.startswith(_BASE) else k: v for k, v in weights.items()}
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


def weights_for_head(weights: dict[str, np.ndarray], head: str) -> dict[str, np.ndarray]:
    """The exported weights under the names `head`'s class reads: BertForQuestionAnswering
    calls the classifier `qa_outputs`."""
    if head != "question_answering":
        return weights
    return {
        (_QA + k[len(_CLASSIFIER) :] if k.startswith(_CLASSIFIER) else k): v
        for k, v in weights.items()
    }


def config_to_hf(cfg: ModelConfig, head: str) -> Any:
    """A BertConfig for our config."""
    import transformers

    if head == "classification" and cfg.pooling != "first":
        # BertForSequenceClassification reads the first token through the tanh pooler.
        raise ValueError(
            f"a classifier with model.pooling={cfg.pooling!r} cannot be written as "
            "BertForSequenceClassification (which pools the first token); fine-tune with "
            "model.pooling=first to export it"
        )
    if head == "question_answering" and cfg.num_labels != 2:
        raise ValueError(
            "BertForQuestionAnswering needs a classifier of 2 labels (start, end logits); this "
            f"model has num_labels={cfg.num_labels}"
        )

    return transformers.BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.d_ff,
        hidden_act=_BACK[cfg.mlp],
        max_position_embeddings=cfg.max_len,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.dropout_rate,
        initializer_range=cfg.init_std,
        num_labels=cfg.num_labels,
    )
