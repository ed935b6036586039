"""Fine-tuning on your own JSONL files: checked lines, rendered pieces, packed rows, a short run."""

import dataclasses
import json
import os

import numpy as np
import pytest

from jaxformer.data import jsonl_tasks
from jaxformer.data.tasks import TaskConfig, load_task, task_batcher, tokenize_task_fields

QUIET = dict(show_progress=False, log=lambda _: None)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def jsonl_cfg(train, evaluation=None, **kw) -> TaskConfig:
    return TaskConfig(name="jsonl", train_files=(train,), eval_files=(evaluation or train,), **kw)


def completions(n):
    # Prompts of different lengths, so rows hold different numbers of examples.
    return [
        {"prompt": f"Q{i}: add {i} and one{' please' * (i % 3)}?\n", "completion": f"A: {i + 1}"}
        for i in range(n)
    ]


def chats(n):
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"u{i}: what is {i} plus one?"},
                {"role": "assistant", "content": f"It is {i + 1}."},
                {"role": "user", "content": "and twice that?"},
                {"role": "assistant", "content": f"{2 * (i + 1)}"},
            ]
        }
        for i in range(n)
    ]


def segments(batch):
    """(row, segment id, slice) of every packed example in a batch."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        end = 0
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            # 1, 2, 3, ... one contiguous run each, in order, padding (0) only after the last
            assert len(where) and where[0] == end and (np.diff(where) == 1).all()
            end = int(where[-1]) + 1
            out.append((r, s, slice(int(where[0]), end)))
        assert not seg[end:].any()
    return out


def learned_runs(targets, weights):
    """The runs of consecutive weighted target ids."""
    runs, current = [], []
    for t, w in zip(targets.tolist(), weights.tolist()):
        if w:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# ------------------------------------------------------------------ config and bad lines


def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="task.name=jsonl needs task.train_files"):
        TaskConfig(name="jsonl")
    with pytest.raises(ValueError, match="needs task.eval_files"):
        TaskConfig(name="jsonl", train_files=("a.jsonl",))
    with pytest.raises(ValueError, match="task.train_files is read only with task.name=jsonl"):
        TaskConfig(name="code_completion", train_files=("a.jsonl",))
    with pytest.raises(ValueError, match="task.kind=chat reads JSONL files"):
        TaskConfig(name="code_completion", kind="chat")
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=f"task.train_files: no such file '{missing}'"):
        jsonl_cfg(missing).resolved()  # kind auto reads the first line
    good = write_jsonl(tmp_path / "good.jsonl", completions(2))
    cfg = jsonl_cfg(good, missing, kind="completion")
    with pytest.raises(ValueError, match=f"task.eval_files: no such file '{missing}'"):
        load_task(cfg, "validation")
    with pytest.raises(ValueError, match="splits 'train' .* and 'validation' .*, not 'test'"):
        load_task(cfg, "test")


def test_auto_kind_comes_from_the_first_line(tmp_path):
    for rows, kind, keys in [
        (completions(1), "completion", ("prompt", "completion")),
        (chats(1), "chat", ("messages", "")),
        ([{"input": "x", "target": "y"}], "text2text", ("input", "target")),
    ]:
        r = jsonl_cfg(write_jsonl(tmp_path / f"{kind}.jsonl", ["", *rows])).resolved()
        assert (r.kind, r.input_key, r.target_key) == (kind, *keys)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=rf"{odd}:1: cannot tell the task kind .*'answer'"):
        jsonl_cfg(odd).resolved()


CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize(
    "kind, line, message",
    [
        ("chat", "{not json", "not valid JSON"),
        ("chat", "[1, 2]", "expected a JSON object, got list"),
        ("chat", {"msgs": []}, "missing key 'messages'"),
        ("chat", {"messages": []}, "'messages' must be a non-empty list"),
        ("chat", {"messages": ["hi"]}, "message 0 must be an object, got str"),
        ("chat", {"messages": [{"role": "user"}]}, "message 0: missing key 'content'"),
        (
            "chat",
            {"messages": [{"role": "user", "content": 3}]},
            "message 0: 'content' must be a string, got int",
        ),
        (
            "chat",
            {"messages": [{"role": "tool", "content": "x"}]},
            "message 0: unknown role 'tool'",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "hi"}]},
            "no assistant turn",
        ),
        ("completion", {"prompt": "p"}, "missing key 'completion'"),
        ("completion", {"prompt": "p", "completion": None}, "'completion' must be a string"),
        ("text2text", {"input": "x", "target": 1}, "'target' must be a string, got int"),
    ],
)
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path, kind, line, message):
    good = {"chat": CHAT_OK, "completion": completions(1)[0]}.get(
        kind, {"input": "a", "target": "b"}
    )
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", good, line, good])
    with pytest.raises(ValueError, match=f"^{path}:4: .*{message}"):
        load_task(jsonl_cfg(path, kind=kind), "train")


def test_bad_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    line = json.dumps(CHAT_OK).encode()
    path.write_bytes(b"\xef\xbb\xbf" + line + b"\r\n" + line + b"\r\n")  # BOM, CRLF: fine
    assert len(load_task(jsonl_cfg(str(path), kind="chat"), "train")) == 2
    path.write_bytes(line + b"\n" + b'{"x": "\xff"}\n')
    with pytest.raises(ValueError, match=f"^{path}:2: not UTF-8"):
        load_task(jsonl_cfg(str(path), kind="chat"), "train")


# ------------------------------------------------------------------ packed rows


def test_completion_rows_pack_examples_with_weights_on_completions(tmp_path, stdlib_tokenizer):
    tok, L = stdlib_tokenizer, 64
    rows = completions(24)
    cfg = jsonl_cfg(write_jsonl(tmp_path / "c.jsonl", rows), max_input_len=L, batch_size=4)
    ex = load_task(cfg, "train")
    batcher = task_batcher(cfg, ex, tok, seed=3)
    assert isinstance(batcher, jsonl_tasks.PackedTaskBatcher)
    by_prompt = {r["prompt"]: r for r in rows}
    seen = []
    for step in range(batcher.num_batches_per_epoch):
        b = batcher.batch(step)
        assert set(b) == {
            "inputs",
            "targets",
            "loss_weights",
            "segment_ids",
            "positions",
            "example_weight",
        }
        assert b["inputs"].shape == (4, L) and b["example_weight"].tolist() == [1.0] * 4
        pad = b["segment_ids"] == 0
        assert not b["loss_weights"][pad].any() and not b["positions"][pad].any()
        for r, _, span in segments(b):
            ids = tok.encode  # every example is whole here (each fits a row)
            text = tok.decode(b["inputs"][r, span])
            prompt = next(p for p in by_prompt if text.startswith(p))
            want = ids(prompt) + ids(by_prompt[prompt]["completion"]) + [tok.eos_id]
            np.testing.assert_array_equal(b["inputs"][r, span], want[:-1])
            np.testing.assert_array_equal(b["targets"][r, span], want[1:])
            np.testing.assert_array_equal(b["positions"][r, span], np.arange(len(want) - 1))
            weighted = b["targets"][r, span][b["loss_weights"][r, span] > 0]
            assert weighted.tolist() == ids(by_prompt[prompt]["completion"]) + [tok.eos_id]
            seen.append((step, prompt))
    per_row = len(seen) / (4 * batcher.num_batches_per_epoch)
    assert per_row > 2, per_row  # several examples share a row
    first_epoch = [p for step, p in seen if step * 4 < batcher.num_rows_per_epoch]
    assert sorted(set(first_epoch)) == sorted(by_prompt)  # each example in the first epoch's rows


def test_chat_rows_learn_every_assistant_turn_and_its_eos(tmp_path, stdlib_tokenizer):
    tok = stdlib_tokenizer
    rows = chats(6)
    cfg = jsonl_cfg(write_jsonl(tmp_path / "chat.jsonl", rows), max_input_len=256, batch_size=2)
    ex = load_task(cfg, "train")
    batches = list(task_batcher(cfg, ex, tok, 0, shuffle=False).eval_batches())
    b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
    found = []
    for r, _, span in segments(b):
        text = tok.decode(b["inputs"][r, span])
        assert text.startswith("<|system|>\nAnswer briefly.\n<|user|>\nu")
        i = int(text.split("<|user|>\nu")[1].split(":")[0])
        found.append(i)
        # Built-in format: each assistant turn is its content and a newline, then EOS.
        answers = [m["content"] for m in rows[i]["messages"] if m["role"] == "assistant"]
        runs = learned_runs(b["targets"][r, span], b["loss_weights"][r, span])
        assert runs == [tok.encode(a + "\n") + [tok.eos_id] for a in answers]
    assert sorted(found) == list(range(6)) and len(batches) < 3  # each once; several per row


class TemplateTokenizer:
    """The test tokenizer with a ChatML-like template (as a Hugging Face tokenizer would have)."""

    chat_template = "chatml"

    def __init__(self, base, drop_history=False):
        self._base, self._drop = base, drop_history

    def __getattr__(self, name):
        return getattr(self._base, name)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        shown = messages
        if self._drop:  # like templates that strip earlier assistant turns
            last = max([i for i, m in enumerate(messages) if m["role"] == "assistant"] or [0])
            shown = [m for i, m in enumerate(messages) if m["role"] != "assistant" or i == last]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in shown)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_a_chat_template_renders_and_its_end_of_turn_is_learned(tmp_path, stdlib_tokenizer):
    tok = TemplateTokenizer(stdlib_tokenizer)
    rows = chats(3)
    cfg = jsonl_cfg(write_jsonl(tmp_path / "chat.jsonl", rows), max_input_len=128, batch_size=1)
    ex = load_task(cfg, "train")
    batcher = task_batcher(cfg, ex, tok, 0, shuffle=False)
    for i, row in enumerate(rows):
        ids, learned = batcher.example_tokens(i)
        assert tok.decode(ids) == tok.apply_chat_template(row["messages"])  # no EOS added
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        runs = learned_runs(ids, learned)
        assert [tok.decode(r) for r in runs] == [a + "<|im_end|>\n" for a in answers]
    bad = jsonl_cfg(write_jsonl(tmp_path / "bad.jsonl", chats(2)), max_input_len=64, batch_size=1)
    stripping = TemplateTokenizer(stdlib_tokenizer, drop_history=True)
    with pytest.raises(ValueError, match=r"bad.jsonl:1: the chat template does not render"):
        task_batcher(bad, load_task(bad, "train"), stripping, 0)


def test_a_hugging_face_template_renders_as_transformers_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf_tokenizer import _byte_level

    from jaxformer.data.hf_tokenizer import HfTokenizer

    directory = str(tmp_path / "tok")
    _byte_level(directory)  # Llama 3 style: '<|eot_id|>' ends every turn
    tok = HfTokenizer.from_directory(directory)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    rows = chats(2)
    cfg = jsonl_cfg(write_jsonl(tmp_path / "chat.jsonl", rows), max_input_len=256, batch_size=1)
    batcher = task_batcher(cfg, load_task(cfg, "train"), tok, 0, shuffle=False)
    for i, row in enumerate(rows):
        ids, learned = batcher.example_tokens(i)
        # (hf.decode: our decode skips pad ids, and this tokenizer pads with '<|eot_id|>')
        assert hf.decode(ids) == hf.apply_chat_template(row["messages"], tokenize=False)
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        runs = [hf.decode(r) for r in learned_runs(ids, learned)]
        assert runs == [a + "<|eot_id|>" for a in answers]


def test_a_long_example_is_cut_keeping_the_completion_start(tmp_path, stdlib_tokenizer):
    tok, L = stdlib_tokenizer, 32
    rows = [
        {"prompt": "context " * 60 + "END:", "completion": " answer" * 60},
        {"prompt": "short:", "completion": " x"},
    ]
    cfg = jsonl_cfg(write_jsonl(tmp_path / "long.jsonl", rows), max_input_len=L, batch_size=2)
    b = next(task_batcher(cfg, load_task(cfg, "train"), tok, 0, shuffle=False).eval_batches())
    P, C = tok.encode(rows[0]["prompt"]), tok.encode(rows[0]["completion"])
    assert (b["segment_ids"][0] == 1).all()  # the long one fills its row alone
    keep_tail = (L + 1) // 2  # half the window for the completion, the prompt's end before it
    want = P[len(P) - (L + 1 - keep_tail) :] + C[:keep_tail]
    np.testing.assert_array_equal(b["inputs"][0], want[:-1])
    np.testing.assert_array_equal(b["targets"][0], want[1:])
    assert tok.decode(P[-(L + 1 - keep_tail) :]).endswith("END:")
    np.testing.assert_array_equal(b["loss_weights"][0], np.arange(L) >= L - keep_tail)
    assert b["segment_ids"][1].max() == 1 and b["example_weight"].tolist() == [1, 1]


def test_batches_are_a_function_of_seed_and_step_and_split_across_processes(
    tmp_path, stdlib_tokenizer
):
    path = write_jsonl(tmp_path / "c.jsonl", completions(30))
    cfg = jsonl_cfg(path, max_input_len=48, batch_size=4)
    ex = load_task(cfg, "train")
    a, again = (task_batcher(cfg, ex, stdlib_tokenizer, seed=5) for _ in range(2))
    per_epoch = a.num_rows_per_epoch
    for step in (0, 2, per_epoch // 4 + 3):  # the last is past the first epoch
        full = a.batch(step)
        for k, v in again.batch(step).items():
            np.testing.assert_array_equal(v, full[k], err_msg=k)
        parts = [a.batch(step, i, 2) for i in range(2)]
        assert parts[0]["inputs"].shape == (2, 48)
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    other = task_batcher(cfg, ex, stdlib_tokenizer, seed=6).batch(0)
    assert not np.array_equal(other["inputs"], a.batch(0)["inputs"])
    # A later step computed first (as after a resume) is the same rows.
    fresh = task_batcher(cfg, ex, stdlib_tokenizer, seed=5)
    late = per_epoch // 4 + 3
    np.testing.assert_array_equal(fresh.batch(late)["inputs"], a.batch(late)["inputs"])


def test_batches_asked_for_by_several_threads_at_once_are_the_same(tmp_path, stdlib_tokenizer):
    import concurrent.futures

    cfg = jsonl_cfg(
        write_jsonl(tmp_path / "c.jsonl", completions(12)), max_input_len=32, batch_size=2
    )
    ex = load_task(cfg, "train")
    steps = list(range(40))[::-1]  # many epochs, the latest first
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(task_batcher(cfg, ex, stdlib_tokenizer, 2).batch, steps))
    alone = task_batcher(cfg, ex, stdlib_tokenizer, 2)
    for step, got in zip(steps, threaded):
        np.testing.assert_array_equal(got["inputs"], alone.batch(step)["inputs"], err_msg=step)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_count_every_example_once(tmp_path, stdlib_tokenizer, process_count):
    tok = stdlib_tokenizer
    rows = completions(21)
    cfg = jsonl_cfg(write_jsonl(tmp_path / "c.jsonl", rows), max_input_len=40, batch_size=4)
    batcher = task_batcher(cfg, load_task(cfg, "train"), tok, 0, shuffle=False)
    streams = [list(batcher.eval_batches(None, i, process_count)) for i in range(process_count)]
    steps = range(batcher.num_batches_per_epoch)
    merged = {k: np.concatenate([p[s][k] for s in steps for p in streams]) for k in streams[0][0]}
    total = batcher.num_rows_per_epoch
    assert total % 4  # a partial last batch, filled with all-padding rows of weight 0
    np.testing.assert_array_equal(
        merged["example_weight"], np.arange(len(merged["inputs"])) < total
    )
    assert not merged["segment_ids"][total:].any() and not merged["loss_weights"][total:].any()
    prompts = []
    for r, _, span in segments(merged):
        text = tok.decode(merged["inputs"][r, span])
        prompts.append(next(row["prompt"] for row in rows if text.startswith(row["prompt"])))
    assert sorted(prompts) == sorted(row["prompt"] for row in rows)  # each example once


def test_pieces_are_tokenized_once_into_a_store_keyed_by_contents(tmp_path, stdlib_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", chats(5))
    cfg = jsonl_cfg(path, max_input_len=96, batch_size=2, data_dir=str(tmp_path / "tfds"))
    ex = load_task(cfg, "train")
    fields = tokenize_task_fields(cfg, ex, stdlib_tokenizer, **QUIET)
    assert set(fields) == {jsonl_tasks.PIECES}
    stored = task_batcher(cfg, ex, stdlib_tokenizer, 1, token_fields=fields)
    in_memory = task_batcher(cfg, ex, stdlib_tokenizer, 1)
    for step in (0, 4):
        a, b = stored.batch(step), in_memory.batch(step)
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    again = tokenize_task_fields(cfg, ex, stdlib_tokenizer, show_progress=False, log=pytest.fail)
    assert again[jsonl_tasks.PIECES].root == fields[jsonl_tasks.PIECES].root
    write_jsonl(path, chats(6))  # new contents: a new store
    changed = tokenize_task_fields(cfg, load_task(cfg, "train"), stdlib_tokenizer, **QUIET)
    assert changed[jsonl_tasks.PIECES].root != fields[jsonl_tasks.PIECES].root


def test_text2text_lines_make_seq2seq_rows(tmp_path, stdlib_tokenizer):
    rows = [{"input": f"x = {i}", "target": f"y{i}"} for i in range(5)]
    cfg = jsonl_cfg(
        write_jsonl(tmp_path / "t.jsonl", rows),
        max_input_len=16,
        max_target_len=8,
        batch_size=5,
        data_dir=str(tmp_path / "tfds"),
    )
    ex = load_task(cfg, "train")
    fields = tokenize_task_fields(cfg, ex, stdlib_tokenizer, **QUIET)
    b = next(task_batcher(cfg, ex, stdlib_tokenizer, 0, token_fields=fields).eval_batches())
    tok = stdlib_tokenizer
    for i, row in enumerate(rows):
        want = tok.encode(row["target"]) + [tok.eos_id]
        np.testing.assert_array_equal(b["targets"][i, : len(want)], want)
        assert tok.decode(b["encoder_inputs"][i]).startswith(row["input"])


# ------------------------------------------------------------------ fine-tuning end to end


@pytest.fixture(scope="module")
def pretrained_gpt(stdlib_data_dir, stdlib_tokenizer, tmp_path_factory):
    """A 2-step gpt-tiny pretraining (the same tiny run other test modules compile)."""
    from data_fixtures import TINY_RUN

    from jaxformer.training.main import run_training

    root = tmp_path_factory.mktemp("sft_pretrained")
    tokenizer_path = str(root / "tok.model")
    stdlib_tokenizer.save(tokenizer_path)
    run_dir = str(root / "run")
    overrides = TINY_RUN + [
        f"data.data_dir={stdlib_data_dir}",
        f"data.tokenizer_path={tokenizer_path}",
        f"data.vocab_size={stdlib_tokenizer.vocab_size}",
        "train.sample_prompt=''",
        "train.steps=2",
        f"run.dir={run_dir}",
    ]
    assert run_training(None, overrides) == 0
    return run_dir


def capital_chats(names):
    return [
        {
            "messages": [
                {"role": "user", "content": f"Where is {n}?"},
                {"role": "assistant", "content": f"{n} is at home."},
            ]
        }
        for n in names
    ]


def test_sft_config_fine_tunes_a_chat_and_its_assistant_loss_falls(
    pretrained_gpt, tmp_path, capsys
):
    from jaxformer.training.finetune import Finetuning, load_finetune, run_finetune
    from jaxformer.training.loop import Trainer

    names = [f"n{i}" for i in range(40)]
    train = write_jsonl(tmp_path / "train.jsonl", capital_chats(names[:32]))
    held_out = write_jsonl(tmp_path / "eval.jsonl", capital_chats(names[32:]))
    run_dir = tmp_path / "sft"
    overrides = [
        f"task.train_files=[{train}]",
        f"task.eval_files=[{held_out}]",
        f"task.data_dir={tmp_path / 'tfds'}",
        "task.batch_size=8",
        f"run.dir={run_dir}",
        "train.steps=40",
        "train.eval_every=0",
        "train.log_every=5",
        "optimizer.learning_rate=3e-3",
        "optimizer.warmup_steps=5",
        "checkpoint.async_save=false",
    ]
    # A malformed line stops the run before anything is written.
    bad = write_jsonl(tmp_path / "bad.jsonl", capital_chats(["a"]) + [{"messages": "hi"}])
    code = run_finetune(
        pretrained_gpt, None, "configs/finetune/sft.yaml", overrides + [f"task.eval_files=[{bad}]"]
    )
    assert code == 2 and f"{bad}:2: 'messages' must be a non-empty list" in capsys.readouterr().err
    assert not os.path.exists(run_dir)

    cfg, meta = load_finetune(pretrained_gpt, None, "configs/finetune/sft.yaml", overrides)
    assert cfg.task.resolved().kind == "chat"
    trainer = Trainer(cfg, Finetuning(meta), **QUIET)
    batcher = trainer.workload.batcher
    assert batcher.num_rows_per_epoch < 32 / 2.5  # packed: several chats per 128-token row
    before = trainer.evaluate()
    after = trainer.run()["validation"]
    trainer.close()
    print(f"[sft] rows {batcher.num_rows_per_epoch}, before {before}, after {after}")
    assert set(after) == {"loss", "token_accuracy", "perplexity"}
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["token_accuracy"] > before["token_accuracy"] + 0.2, (before, after)
    # The run reads back: eval.py's path re-reads the files and gives the same loss.
    from jaxformer.training.evaluate import run_eval

    report = tmp_path / "report.json"
    assert run_eval(str(run_dir), None, None, str(report), plot=False, prompt=None) == 0
    loss = json.loads(report.read_text())["metrics"]["loss"]
    assert loss == pytest.approx(after["loss"], rel=1e-5)
    # Exporting needs no data: the head comes from the model, not from the files' first line.
    from jaxformer.convert.runs import run_head

    os.rename(train, train + ".moved")
    jsonl_tasks.sniff_kind.cache_clear()
    assert run_head(str(run_dir)) is None


def test_sft_yaml_is_a_jsonl_decoder_task():
    from jaxformer.config import load_config
    from jaxformer.training.finetune import FinetuneExperiment

    cfg = load_config(FinetuneExperiment, "configs/finetune/sft.yaml", ["task.kind=chat"])
    task = cfg.task
    assert task.name == "jsonl" and task.train_files and task.eval_files
    assert dataclasses.replace(task, kind="completion").resolved().input_key == "prompt"
    from jaxformer import models

    assert (
        models.FAMILY_OF_TASK_KIND["chat"]
        == models.FAMILY_OF_TASK_KIND["completion"]
        == ("decoder")
    )
