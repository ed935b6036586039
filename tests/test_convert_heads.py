"""BertForTokenClassification / BertForQuestionAnswering <-> our encoder's per-token heads."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jaxformer import convert  # noqa: E402
from jaxformer.convert import common  # noqa: E402

tf.logging.set_verbosity_error()
V, B, S = 96, 3, 12
ATOL = 1e-4
RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, V, (B, S))
TYPES = RNG.integers(0, 2, (B, S))
MASK = np.ones((B, S), np.int64)
MASK[1, 7:], MASK[2, 3:] = 0, 0
HEADS = {
    "token_classification": (tf.BertForTokenClassification, 5),
    "question_answering": (tf.BertForQuestionAnswering, 2),
}


def hf_model(head):
    cls, num_labels = HEADS[head]
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    return cls(config).eval()


def hf_logits(head, hf):
    t = torch.tensor
    with torch.no_grad():
        out = hf(t(TOKENS), attention_mask=t(MASK), token_type_ids=t(TYPES))
    if head == "token_classification":
        return out.logits.numpy()
    return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], axis=-1)


def our_logits(head, model):
    kw = dict(attention_mask=jnp.asarray(MASK), token_types=jnp.asarray(TYPES))
    if head == "token_classification":
        return np.asarray(model.token_logits(jnp.asarray(TOKENS), **kw))
    start, end = model.span_logits(jnp.asarray(TOKENS), **kw)
    return np.stack([np.asarray(start), np.asarray(end)], axis=-1)


@pytest.mark.parametrize("head", list(HEADS))
def test_logit_parity_both_ways(head, tmp_path):
    hf = hf_model(head)
    model, cfg = convert.from_hf(hf)
    assert cfg.num_labels == HEADS[head][1]
    ref = hf_logits(head, hf)
    diff = np.abs(our_logits(head, model) - ref).max()
    print(f"{head} from-hf: max abs logit difference {diff:.2e}")
    assert diff < ATOL
    out = convert.to_hf(model, cfg, tmp_path / "hf", head=head)
    auto = {
        "token_classification": tf.AutoModelForTokenClassification,
        "question_answering": tf.AutoModelForQuestionAnswering,
    }[head]
    reloaded, info = auto.from_pretrained(out, output_loading_info=True)
    assert type(reloaded) is HEADS[head][0]
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    back = hf_logits(head, reloaded.eval())
    diff = np.abs(back - ref).max()
    print(f"{head} to-hf: max abs logit difference {diff:.2e}")
    assert diff < ATOL
    again, cfg2 = convert.from_hf(out)
    assert cfg2 == cfg
    before, after = common.flat_params(model), common.flat_params(again)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_question_answering_export_needs_two_labels(tmp_path):
    model, cfg = convert.from_hf(hf_model("token_classification"))
    with pytest.raises(ValueError, match="needs a classifier of 2 labels"):
        convert.to_hf(model, cfg, tmp_path / "hf", head="question_answering")


# One head end to end (~30 s): QA, whose export renames the classifier; the token head's
# choice by to-hf is checked without transformers in test_encoder_heads.py.
@pytest.mark.parametrize("head", ["question_answering"])
def test_fine_tuned_run_exports_as_its_task_head(head, stdlib_data_dir, stdlib_tokenizer, tmp_path):
    """from-hf -> fine-tune on the built-in demo -> to-hf writes the task's class, same logits."""
    from jaxformer.convert.__main__ import main as cli
    from jaxformer.convert.runs import load_run
    from jaxformer.data import task_builders
    from jaxformer.training.evaluate import run_eval
    from jaxformer.training.finetune import run_finetune

    cls, _ = HEADS[head]
    num_labels = 2 if head == "question_answering" else len(task_builders.TOKEN_TAGS)
    config = tf.BertConfig(
        vocab_size=stdlib_tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    cls(config).eval().save_pretrained(tmp_path / "hf")
    stdlib_tokenizer.save(str(tmp_path / "tok.model"))
    run = str(tmp_path / "run")
    assert (
        cli(["from-hf", str(tmp_path / "hf"), run, "--tokenizer", str(tmp_path / "tok.model")]) == 0
    )
    finetuned = str(tmp_path / "finetuned")
    overrides = [
        f"task.data_dir={stdlib_data_dir}",
        "task.max_input_len=64",
        "task.batch_size=8",
        "task.max_examples=24",
        "train.steps=2",
        "train.eval_every=0",
        "optimizer.warmup_steps=1",
        "checkpoint.async_save=false",
        f"run.dir={finetuned}",
    ]
    demo = "code_tokens" if head == "token_classification" else "code_qa"
    assert run_finetune(run, None, f"configs/finetune/{demo}.yaml", overrides) == 0
    report = tmp_path / "report.json"
    assert run_eval(finetuned, None, None, str(report), False, None) == 0
    metric = "entity_f1" if head == "token_classification" else "exact_match"
    assert metric in report.read_text()
    assert cli(["to-hf", finetuned, str(tmp_path / "out")]) == 0  # the head from the run
    back = tf.AutoConfig.from_pretrained(tmp_path / "out")
    assert back.architectures == [cls.__name__] and back.num_labels == num_labels
    hf = cls.from_pretrained(tmp_path / "out").eval()
    model, _ = load_run(finetuned)
    global TOKENS
    saved, TOKENS = TOKENS, TOKENS % stdlib_tokenizer.vocab_size
    try:
        diff = np.abs(our_logits(head, model) - hf_logits(head, hf)).max()
    finally:
        TOKENS = saved
    print(f"{head} fine-tuned run to-hf: max abs logit difference {diff:.2e}")
    assert diff < ATOL
