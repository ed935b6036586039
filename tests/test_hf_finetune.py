"""The README's "Fine-tuning a Hugging Face checkpoint" commands, run as written on a tiny Llama
with its own byte-level BPE tokenizer and chat template: from-hf -> finetune.py on a JSONL chat
file (the assistant-token loss falls) -> eval.py --generate -> to-hf -> transformers loads the
export and generates the same text. Skipped without the `hf` extra."""

import importlib.util
import json
import os
import re
import shlex

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_tokenizer import _byte_level  # noqa: E402

from jaxformer.convert.__main__ import main as convert_cli  # noqa: E402
from jaxformer.training.metrics import read_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
HF_DIR_IN_README = "path/to/Llama-3.2-1B-Instruct"
PROMPT = "What is 2 plus 3?"
# What makes the README's commands tiny here: a few steps of small packed rows, a short answer.
TINY = {
    "finetune.py": "train.steps=30 train.eval_every=0 train.log_every=5 optimizer.warmup_steps=2 "
    "optimizer.learning_rate=3e-3 task.max_input_len=64 task.batch_size=8 checkpoint.every=100 "
    "checkpoint.async_save=false",
    "eval.py": "--batches 1",
}


def _script_main(name: str):
    """The main() of a command-line script at the repository root (finetune.py, eval.py)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def readme_commands() -> list[str]:
    """The bash block of the README section, one command per line."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Fine-tuning a Hugging Face checkpoint", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _chats(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(1, 9, 2))
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You add numbers."},
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                ]
            }
        )
    return rows


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A random Llama-3-style checkpoint saved with its tokenizer and generation config."""
    directory = str(tmp_path_factory.mktemp("hf") / "tiny-llama")
    _byte_level(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[1, 4],
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def _run(command: str, tmp_path, hf_dir: str) -> int:
    """One README command, with paths moved under tmp_path and the tiny settings added."""
    command = command.replace(HF_DIR_IN_README, hf_dir)
    args = shlex.split(command)
    assert args[0] == "python", command
    args = [
        a.replace("runs/", f"{tmp_path}/runs/")
        .replace("out/", f"{tmp_path}/out/")
        .replace("[chats.jsonl]", f"[{tmp_path}/chats.jsonl]")
        for a in args
    ]
    if args[1] == "-m":
        assert args[2] == "jaxformer.convert"
        return convert_cli(args[3:])
    script = args[1]
    argv = args[2:] + shlex.split(TINY.get(script, ""))
    return _script_main(script)(argv)


def test_readme_commands_fine_tune_a_converted_llama_and_export_it(tiny_llama, tmp_path):
    with open(tmp_path / "chats.jsonl", "w", encoding="utf-8") as f:
        for row in _chats(64):
            f.write(json.dumps(row) + "\n")
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["-m", "finetune.py", "eval.py", "-m"]
    for command in commands[:2]:
        assert _run(command, tmp_path, tiny_llama) == 0, command

    # The loss (on assistant tokens only) fell.
    rows = read_metrics(str(tmp_path / "runs/llama-sft"))
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses) >= 4 and losses[-1] < 0.7 * losses[0], losses

    report = tmp_path / "report.json"
    eval_command = commands[2] + f" --out {report}"
    assert _run(eval_command, tmp_path, tiny_llama) == 0
    sample = json.loads(report.read_text())["samples"][0]
    assert sample["prompt"] == PROMPT
    ours = sample["output"]

    assert _run(commands[3], tmp_path, tiny_llama) == 0
    out = str(tmp_path / "out/llama-sft")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(chat, add_special_tokens=False, return_tensors="pt").input_ids
    stops = model.generation_config.eos_token_id
    with torch.no_grad():
        new = model.generate(
            ids, max_new_tokens=64, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
        )[0, ids.shape[1] :].tolist()
    stops = set(stops if isinstance(stops, list) else [stops])
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert len(new) >= 3  # the fine-tuned model answers before it stops
    assert tokenizer.decode(new) == ours


def test_fine_tuning_straight_from_the_hf_directory_on_a_mesh(tiny_llama, tmp_path):
    """--from hf:DIR streams the weights onto the run's mesh: its first steps are the converted
    run's, step for step."""
    with open(tmp_path / "chats.jsonl", "w", encoding="utf-8") as f:
        for row in _chats(16):
            f.write(json.dumps(row) + "\n")
    assert convert_cli(["from-hf", tiny_llama, str(tmp_path / "converted")]) == 0
    common = [
        "--config",
        "configs/finetune/sft.yaml",
        f"task.train_files=[{tmp_path}/chats.jsonl]",
        f"task.eval_files=[{tmp_path}/chats.jsonl]",
        *shlex.split(TINY["finetune.py"]),
        "train.steps=3",
        "train.log_every=1",
        "mesh.shape=[2,2,2]",
    ]
    losses = {}
    for name, source in (("hf", f"hf:{tiny_llama}"), ("run", str(tmp_path / "converted"))):
        run_dir = tmp_path / f"ft-{name}"
        finetune = _script_main("finetune.py")
        assert finetune(["--from", source, *common, f"run.dir={run_dir}"]) == 0
        rows = read_metrics(str(run_dir))
        losses[name] = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses["hf"]) == 3
    np.testing.assert_allclose(losses["hf"], losses["run"], rtol=1e-6)


def test_a_converted_run_continues_pretraining_with_its_own_tokenizer(
    tiny_llama, stdlib_data_dir, tmp_path
):
    """train.py on a converted run (weights only, its HF tokenizer): trains with a fresh
    optimizer, saves, and reports bits per byte through the tokenizer's byte lengths."""
    from jaxformer.training.checkpoint import Checkpointer
    from jaxformer.training.main import run_training

    run = tmp_path / "converted"
    assert convert_cli(["from-hf", tiny_llama, str(run)]) == 0
    overrides = [
        f"data.data_dir={stdlib_data_dir}",
        f"data.tokens_dir={tmp_path}/tokens",
        "data.max_documents=64",
        "data.seq_len=32",
        "data.batch_size=8",
        "train.steps=2",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.log_every=1",
        "train.sample_prompt=",
        "optimizer.warmup_steps=1",
        "checkpoint.every=2",
        "checkpoint.async_save=false",
    ]
    assert run_training(str(run / "config.yaml"), overrides) == 0
    meta = Checkpointer(str(run), create=False).read_meta()
    assert meta["step"] == 2 and "params_only" not in meta  # now a whole training state
    validation = [r for r in read_metrics(str(run)) if r.get("split") == "validation"]
    assert validation and 0 < validation[-1]["bits_per_byte"] < 20
