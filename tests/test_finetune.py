"""Fine-tuning and evaluation entry points: restored weights, learning, reports, clear errors."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxformer.convert.runs import load_run
from jaxformer.training.config import load_experiment
from jaxformer.training.evaluate import run_eval
from jaxformer.training.finetune import Finetuning, load_finetune, run_finetune
from jaxformer.training.loop import Trainer

QUIET = dict(show_progress=False, log=lambda _: None)
PRETRAIN = {"decoder": "gpt-tiny", "encoder": "bert-tiny", "encoder_decoder": "t5-tiny"}
TASK = {
    "encoder": "code_package",
    "encoder_decoder": "code_docstring",
    "decoder": "code_completion",
}


@pytest.fixture(scope="module")
def pretrained(stdlib_data_dir, stdlib_tokenizer, tmp_path_factory):
    """One short pretraining run per family (module-scoped: built once)."""
    root = tmp_path_factory.mktemp("pretrained")
    tokenizer_path = str(root / "tok.model")
    stdlib_tokenizer.save(tokenizer_path)
    runs = {}
    for family, preset in PRETRAIN.items():
        run_dir = str(root / family)
        cfg = load_experiment(
            None,
            [
                f"model.preset={preset}",
                f"data.data_dir={stdlib_data_dir}",
                f"data.tokenizer_path={tokenizer_path}",
                "data.seq_len=64",
                "data.batch_size=16",
                "train.steps=60",
                "train.eval_every=0",
                "train.eval_batches=1",
                "train.log_every=20",
                "optimizer.learning_rate=3e-3",
                "optimizer.warmup_steps=5",
                "checkpoint.async_save=false",
                f"run.dir={run_dir}",
            ],
        )
        trainer = Trainer(cfg, **QUIET)
        trainer.run()
        trainer.close()
        runs[family] = run_dir
    return runs


def finetune_overrides(data_dir, run_dir, steps):
    return [
        f"task.data_dir={data_dir}",
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.log_every=10",
        "checkpoint.async_save=false",
        f"optimizer.warmup_steps={min(steps, 10)}",
    ]


def test_restored_weights_equal_the_pretrained_ones(pretrained, stdlib_data_dir, tmp_path):
    cfg, meta = load_finetune(
        pretrained["encoder"],
        None,
        "configs/finetune/code_package.yaml",
        finetune_overrides(stdlib_data_dir, str(tmp_path / "ft"), 1),
    )
    trainer = Trainer(cfg, Finetuning(meta), **QUIET)
    assert sorted(trainer.workload.new_parameters) == ["classifier.bias", "classifier.kernel"]
    model, _ = nnx.merge(trainer.graphdef, trainer.state)
    pre_model, _ = load_run(pretrained["encoder"])  # the arrays, without a read-only Trainer
    pre_params = dict(nnx.to_flat_state(nnx.state(pre_model, nnx.Param)))
    compared = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "classifier":
            assert (
                var[...].shape[-1]
                == trainer.cfg.model.num_labels
                == len(trainer.workload.label_names)
            )
            continue
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(pre_params[path][...]))
        compared += 1
    assert compared > 20
    trainer.close()


def test_freezing_keeps_embeddings_fixed(pretrained, stdlib_data_dir, tmp_path):
    overrides = finetune_overrides(stdlib_data_dir, str(tmp_path / "ft"), 3)
    cfg, meta = load_finetune(
        pretrained["decoder"],
        None,
        "configs/finetune/code_completion.yaml",
        overrides + ["finetune.freeze=[embed]"],
    )
    trainer = Trainer(cfg, Finetuning(meta), **QUIET)
    before = jax.device_get(nnx.to_pure_dict(nnx.state(trainer.state[0])))
    trainer.run()
    after = jax.device_get(nnx.to_pure_dict(nnx.state(trainer.state[0])))
    trainer.close()
    np.testing.assert_array_equal(
        before["embed"]["token_embed"]["embedding"], after["embed"]["token_embed"]["embedding"]
    )
    assert not np.array_equal(
        before["blocks"]["mlp"]["up"]["kernel"], after["blocks"]["mlp"]["up"]["kernel"]
    )


def test_freeze_prefix_matching_nothing_is_an_error(pretrained, stdlib_data_dir, tmp_path):
    overrides = finetune_overrides(stdlib_data_dir, str(tmp_path / "ft"), 3)
    cfg, meta = load_finetune(
        pretrained["decoder"],
        None,
        "configs/finetune/code_completion.yaml",
        overrides + ["finetune.freeze=[blocks.0]"],
    )
    with pytest.raises(ValueError, match=r"\['blocks.0'\] match no parameter.*blocks.mlp"):
        Trainer(cfg, Finetuning(meta), **QUIET)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["encoder", "encoder_decoder", "decoder"])
def test_each_family_beats_chance_on_its_task(
    family, pretrained, stdlib_data_dir, tmp_path, capsys
):
    run_dir = str(tmp_path / family)
    config = f"configs/finetune/{TASK[family]}.yaml"
    cfg, meta = load_finetune(
        pretrained[family], None, config, finetune_overrides(stdlib_data_dir, run_dir, 150)
    )
    trainer = Trainer(cfg, Finetuning(meta), **QUIET)
    result = trainer.run()["validation"]
    trainer.close()
    if family == "encoder":
        labels = [ex["label"] for ex in trainer.workload.eval_batcher.examples]
        majority = np.bincount(labels).max() / len(labels)
        chance = 1.0 / trainer.cfg.model.num_labels
        assert result["accuracy"] > max(majority, 2.5 * chance), (result, majority)
        assert result["macro_f1"] > 1.5 * chance, result
    else:
        # Chance is a uniform guess over the vocabulary: ln(V) nats and 1/V token accuracy.
        vocab = trainer.cfg.model.vocab_size
        assert result["loss"] < np.log(vocab) - 1.0, result
        assert result["token_accuracy"] > 10.0 / vocab, result
    if family == "encoder_decoder":
        assert {"rouge_l", "bleu", "exact_match"} <= set(result)
    code = run_eval(run_dir, None, None, str(tmp_path / "report.json"), plot=True, prompt=None)
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["loss"] == pytest.approx(result["loss"], rel=1e-5)
    assert os.path.getsize(report["plot"]) > 1000


def test_eval_of_a_pretraining_run_reports_and_generates(pretrained, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert (
        run_eval(
            pretrained["decoder"],
            None,
            None,
            str(out),
            plot=False,
            prompt="def add(a, b):",
            int8=True,
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert {"loss", "perplexity", "bits_per_byte"} <= set(report["metrics"])
    int8 = report["int8"]
    assert abs(int8["loss"] - report["metrics"]["loss"]) < 0.02, (int8, report["metrics"])
    assert int8["weight_bytes_int8"] < 0.3 * int8["weight_bytes_float"]
    assert report["samples"][0]["prompt"] == "def add(a, b):"
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "def add(a, b):" in printed


def test_bad_input_is_one_clear_message(pretrained, stdlib_data_dir, tmp_path, capsys):
    overrides = finetune_overrides(stdlib_data_dir, str(tmp_path / "ft"), 1)
    cases = [
        (lambda: run_finetune(str(tmp_path / "nothing"), None, None, overrides), "no checkpoints"),
        (
            lambda: run_finetune(
                pretrained["decoder"], None, "configs/finetune/code_package.yaml", overrides
            ),
            "needs a model of family 'encoder'",
        ),
        (
            lambda: run_finetune(pretrained["decoder"], 12345, None, overrides),
            "no checkpoint at step 12345",
        ),
        (
            lambda: run_eval(pretrained["decoder"], 999, None, None, False, None),
            "no checkpoint at step 999",
        ),
        (
            lambda: run_eval(pretrained["decoder"], None, None, None, False, "x = 1\n" * 200),
            "max_len",
        ),
    ]
    for call, message in cases:
        assert call() == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not os.path.exists(tmp_path / "ft" / "checkpoints")
