"""Fine-tuning tasks: the stdlib task builders, load_task over built-in and TFDS datasets, task batches."""

import ast
import collections
import dataclasses
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxformer.data import corpus, task_builders
from jaxformer.data.task_builders import extract_functions
from jaxformer.data.tasks import TaskBatcher, TaskConfig, load_task, tokenize_task_fields

# 3.13 dropped lib2to3 and distutils: its stdlib has only 11 packages with files in both splits.
MIN_CLASSES = 12 if sys.version_info < (3, 13) else 11

MINI_SOURCE = '''\
def plain(a, b):
    """Adds two numbers.

    More text here.
    """

    return a + b


class Box:
    """A box (classes are not examples)."""

    @property
    def size(self):
        """The size."""
        return 3

    async def fetch(self, url):
        """
        Fetches url.
        """
        def inner(x):
            """Inner helper."""
            return x
        return inner(url)

    def only_doc(self):
        """Nothing else: skipped."""

    def same_line(self): "Shares its line: skipped."; return 1

    def no_doc(self):
        return 2
'''


def _all(source):
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="session")
def task_data_dir(stdlib_data_dir):
    for name in task_builders.BUILDERS:
        task_builders.build_task_dataset(name, stdlib_data_dir)
    return stdlib_data_dir


def _split(data_dir, name, split):
    """All rows of a split, texts as str and labels as int."""
    rows = _all(task_builders.build_task_dataset(name, data_dir).as_data_source(split=split))
    return [{k: corpus.python_value(v) for k, v in r.items()} for r in rows]


def test_extract_functions_on_a_hand_written_source():
    found = {f["qualname"]: f for f in extract_functions(MINI_SOURCE)}
    assert list(found) == ["plain", "Box.size", "Box.fetch", "Box.fetch.inner"]
    assert found["plain"]["summary"] == "Adds two numbers."
    assert found["plain"]["docstring"] == "Adds two numbers.\n\nMore text here."
    assert found["plain"]["source"] == "def plain(a, b):\n    return a + b"
    assert found["Box.size"]["source"] == "@property\ndef size(self):\n    return 3"
    assert found["Box.fetch"]["summary"] == "Fetches url."
    assert found["Box.fetch"]["source"] == (
        "async def fetch(self, url):\n"
        "    def inner(x):\n"
        '        """Inner helper."""\n'
        "        return x\n"
        "    return inner(url)"
    )
    assert found["Box.fetch.inner"]["source"] == "def inner(x):\n    return x"
    assert found["Box.fetch.inner"]["name"] == "inner" and found["Box.fetch.inner"]["lineno"] == 22
    for f in found.values():
        tree = ast.parse(f["source"])
        assert ast.get_docstring(tree.body[0]) is None
        assert f["summary"] not in f["source"].split("\n")[-1]


def test_code_chunks_are_consecutive_line_windows():
    text = "\n".join(f"x{i} = {i}" for i in range(65)) + "\n\n\n"
    chunks = task_builders.code_chunks(text)
    assert [start for start, _ in chunks] == [0, 30, 60]
    assert chunks[0][1] == "\n".join(f"x{i} = {i}" for i in range(30))
    assert chunks[2][1].split("\n") == [f"x{i} = {i}" for i in range(60, 65)]


@pytest.mark.parametrize("name", list(task_builders.BUILDERS))
def test_builders_are_deterministic_and_split_by_file(task_data_dir, tmp_path, name):
    other = str(tmp_path / "tfds")
    task_builders.build_task_dataset(name, other)
    paths = {}
    for split in ("train", "validation"):
        rows = _split(task_data_dir, name, split)
        assert rows == _split(other, name, split)
        assert len(rows) > 100 if split == "train" else len(rows) > 10
        paths[split] = {r["path"] for r in rows}
        assert all(corpus.split_of(p) == split for p in paths[split])
    assert not paths["train"] & paths["validation"]
    builder = task_builders.build_task_dataset(name, task_data_dir)
    assert builder.info.file_format.value == "array_record"
    assert builder.info.metadata["file_list_sha256"] == corpus.file_list_hash(corpus.stdlib_files())


def test_code_package_classes_are_in_both_splits_and_capped(task_data_dir):
    builder = task_builders.build_task_dataset("code_package", task_data_dir)
    names = builder.info.features["label"].names
    assert MIN_CLASSES <= len(names) <= task_builders.MAX_CLASSES and names == sorted(names)
    for split in ("train", "validation"):
        rows = _split(task_data_dir, "code_package", split)
        counts = collections.Counter(int(r["label"]) for r in rows)
        assert set(counts) == set(range(len(names))), split
        assert max(counts.values()) <= task_builders.CLASS_CAP[split]
        for r in rows:
            assert r["path"].split("/")[0] == names[int(r["label"])]
            assert 0 < r["text"].count("\n") < task_builders.CHUNK_LINES


def test_docstring_and_completion_pairs_match_the_source_files(task_data_dir):
    docs = {
        (r["path"], r["name"]): r for r in _split(task_data_dir, "code_docstring", "validation")
    }
    comps = {
        (r["path"], r["name"]): r for r in _split(task_data_dir, "code_completion", "validation")
    }
    assert docs.keys() == comps.keys()
    for (path, name), d in docs.items():
        c = comps[(path, name)]
        assert d["source"] == c["completion"]
        assert d["target"] and d["target"] == c["prompt"].split("\n")[0].strip()
        node = ast.parse(d["source"]).body[0]
        assert (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name == name.split(".")[-1]
        )
        assert ast.get_docstring(node) is None


def test_load_task_builtins_and_config_defaults(task_data_dir):
    ex = load_task(TaskConfig(name="code_package", data_dir=task_data_dir), "validation")
    assert ex.num_labels == len(ex.label_names) >= MIN_CLASSES
    assert set(ex[0]) == {"text", "label"}
    assert isinstance(ex[0]["text"], str) and isinstance(ex[0]["label"], int)
    t2t = load_task(
        TaskConfig(name="code_docstring", data_dir=task_data_dir, max_examples=5), "train"
    )
    assert len(t2t) == 5 and set(t2t[-1]) == {"source", "target"} and t2t.num_labels is None
    comp = load_task(TaskConfig(name="code_completion", data_dir=task_data_dir), "validation")
    assert set(comp[0]) == {"prompt", "completion"}
    with pytest.raises(ValueError, match="split 'test' not in dataset 'code_package'"):
        load_task(TaskConfig(name="code_package", data_dir=task_data_dir), "test")
    match = "feature 'body' not in dataset 'code_docstring'; available: name, path"
    with pytest.raises(ValueError, match=match):
        load_task(
            TaskConfig(name="code_docstring", input_key="body", data_dir=task_data_dir), "train"
        )
    with pytest.raises(ValueError, match="no examples"):
        load_task(TaskConfig(name="code_package", data_dir=task_data_dir, max_examples=0), "train")


def test_task_config_errors():
    with pytest.raises(ValueError, match="'glue/sst2' is not a built-in.*set kind"):
        TaskConfig(name="glue/sst2")
    with pytest.raises(ValueError, match="kind 'regression'"):
        TaskConfig(kind="regression")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        TaskConfig(batch_size=0)
    r = TaskConfig(
        name="xsum", kind="text2text", input_key="document", target_key="summary"
    ).resolved()
    assert (r.input_key, r.target_key, r.label_key) == ("document", "summary", "")


def example_row(batcher, index):
    """The batch row of example `index` (weight 1): batch `index` of an unshuffled batcher of one."""
    cfg = dataclasses.replace(batcher.cfg, batch_size=1)
    one = TaskBatcher(
        cfg,
        batcher.examples,
        batcher.tokenizer,
        seed=0,
        shuffle=False,
        token_fields=batcher.token_fields,
    )
    return {k: v[0] for k, v in one.batch(index).items()}


def _check_common(batch, B, weight=1.0):
    for k, v in batch.items():
        want = np.float32 if k in ("loss_weights", "example_weight") else np.int32
        assert v.dtype == want and v.shape[0] == B, k
    np.testing.assert_array_equal(batch["example_weight"], np.full(B, weight, np.float32))


def test_classification_batches(task_data_dir, stdlib_tokenizer):
    cfg = TaskConfig(name="code_package", data_dir=task_data_dir, max_input_len=64, batch_size=8)
    ex = load_task(cfg, "validation")
    batcher = TaskBatcher(cfg, ex, stdlib_tokenizer, seed=3)
    b = batcher.batch(5)
    _check_common(b, 8)
    assert b["inputs"].shape == b["segment_ids"].shape == b["positions"].shape == (8, 64)
    assert b["labels"].shape == (8,)
    assert (b["inputs"][:, 0] == stdlib_tokenizer.bos_id).all()
    for i in range(len(ex)):
        row = example_row(batcher, i)
        ids = stdlib_tokenizer.encode(ex[i]["text"])
        n = min(len(ids) + 1, 64)
        want = np.pad([stdlib_tokenizer.bos_id] + ids[:63], (0, 64 - n))
        np.testing.assert_array_equal(row["inputs"], want)
        np.testing.assert_array_equal(row["segment_ids"], np.arange(64) < n)
        np.testing.assert_array_equal(
            row["positions"], np.where(np.arange(64) < n, np.arange(64), 0)
        )
        assert row["labels"] == ex[i]["label"]


def test_text2text_batches(task_data_dir, stdlib_tokenizer):
    cfg = TaskConfig(
        name="code_docstring",
        data_dir=task_data_dir,
        max_input_len=48,
        max_target_len=12,
        batch_size=4,
    )
    ex = load_task(cfg, "validation")
    b = TaskBatcher(cfg, ex, stdlib_tokenizer, seed=0).batch(0)
    _check_common(b, 4)
    eos = stdlib_tokenizer.eos_id
    assert b["encoder_inputs"].shape == b["encoder_segment_ids"].shape == (4, 48)
    for k in (
        "decoder_inputs",
        "targets",
        "loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
    ):
        assert b[k].shape == (4, 12), k
    np.testing.assert_array_equal(b["decoder_inputs"][:, 0], 0)
    real = b["decoder_segment_ids"][:, 1:] == 1  # shifted right within the real target tokens
    np.testing.assert_array_equal(b["decoder_inputs"][:, 1:][real], b["targets"][:, :-1][real])
    np.testing.assert_array_equal(b["decoder_inputs"][:, 1:][~real], 0)
    np.testing.assert_array_equal(b["loss_weights"], b["decoder_segment_ids"])
    batcher = TaskBatcher(cfg, ex, stdlib_tokenizer, seed=0)
    for i in range(20):
        row = example_row(batcher, i)
        src, tgt = (
            stdlib_tokenizer.encode(ex[i]["source"]),
            stdlib_tokenizer.encode(ex[i]["target"]),
        )
        enc = src[:47] + [eos]
        np.testing.assert_array_equal(row["encoder_inputs"], np.pad(enc, (0, 48 - len(enc))))
        np.testing.assert_array_equal(row["encoder_segment_ids"], np.arange(48) < len(enc))
        dec = (tgt + [eos])[:12]
        np.testing.assert_array_equal(row["targets"], np.pad(dec, (0, 12 - len(dec))))
        np.testing.assert_array_equal(row["loss_weights"], np.arange(12) < len(dec))


def _completion_batcher(tok, prompts, completions, L):
    cfg = TaskConfig(name="code_completion", max_input_len=L, batch_size=len(prompts))
    examples = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    return TaskBatcher(cfg, examples, tok, seed=0, shuffle=False)


def test_completion_weights_are_zero_on_the_prompt_and_one_on_the_completion(stdlib_tokenizer):
    tok = stdlib_tokenizer
    prompts = ["Return x.", "Adds numbers.\n" * 30, "Short."]
    completions = [
        "def f(x):\n    return x",
        "def add(a, b):\n    return a + b",
        "def g():\n" + "    pass\n" * 40,
    ]
    L = 40
    b = _completion_batcher(tok, prompts, completions, L).batch(0)
    _check_common(b, 3)
    for r in range(3):
        P, C = tok.encode(prompts[r]), tok.encode(completions[r])
        p = int(b["prompt_lengths"][r])
        n = int(b["segment_ids"][r].sum())
        assert b["inputs"][r, p - 1] == tok.bos_id
        np.testing.assert_array_equal(b["inputs"][r, 1:n], b["targets"][r, : n - 1])
        np.testing.assert_array_equal(
            b["loss_weights"][r], (np.arange(L) >= p - 1) & (np.arange(L) < n)
        )
        np.testing.assert_array_equal(
            b["positions"][r], np.where(np.arange(L) < n, np.arange(L), 0)
        )
        head, tail = P + [tok.bos_id], C + [tok.eos_id]
        if len(head) + len(tail) <= L + 1:  # fits: prompt + sep + completion + eos, untouched
            assert n == len(head) + len(tail) - 1 and p == len(head)
            np.testing.assert_array_equal(b["targets"][r, p - 1 : n], tail)
        elif r == 1:  # long prompt: cut on the left, the completion keeps its tokens
            assert p - 1 + len(tail) == L + 1 - 1 and b["targets"][r, n - 1] == tok.eos_id
            np.testing.assert_array_equal(b["inputs"][r, : p - 1], P[len(P) - (p - 1) :])
        else:  # long completion: keeps the whole short prompt, cut on the right without eos
            assert p == len(head) and n == L and b["targets"][r, n - 1] == C[n - p]
    assert n - (p - 1) >= (L + 1) // 2 - 1


def test_completion_budget_keeps_half_for_the_completion(stdlib_tokenizer):
    tok = stdlib_tokenizer
    long_text = "word " * 200
    b = _completion_batcher(tok, [long_text], [long_text], 32).batch(0)
    p = int(b["prompt_lengths"][0])
    assert int(b["loss_weights"].sum()) == 32 - (p - 1) and 32 + 1 - p == (32 + 1) // 2


def test_batches_are_a_function_of_seed_and_step_and_slice_per_process(
    task_data_dir, stdlib_tokenizer
):
    cfg = TaskConfig(
        name="code_docstring",
        data_dir=task_data_dir,
        max_input_len=32,
        max_target_len=8,
        batch_size=8,
    )
    ex = load_task(cfg, "validation")
    a, again = (
        TaskBatcher(cfg, ex, stdlib_tokenizer, seed=7),
        TaskBatcher(cfg, ex, stdlib_tokenizer, seed=7),
    )
    for step in (0, 3, 40):  # 40 is past the first epoch
        full = a.batch(step)
        for k, v in again.batch(step).items():
            np.testing.assert_array_equal(v, full[k])
        parts = [a.batch(step, i, 4) for i in range(4)]
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    other = TaskBatcher(cfg, ex, stdlib_tokenizer, seed=8).batch(0)
    assert not np.array_equal(other["encoder_inputs"], a.batch(0)["encoder_inputs"])
    with pytest.raises(ValueError, match="not divisible"):
        a.batch(0, 0, 3)


def test_each_training_epoch_visits_every_example_once(stdlib_tokenizer):
    cfg = TaskConfig(name="code_package", max_input_len=8, batch_size=4)
    examples = [{"text": f"x = {i}", "label": i} for i in range(10)]
    batcher = TaskBatcher(cfg, examples, stdlib_tokenizer, seed=1)
    labels = np.concatenate([batcher.batch(s)["labels"] for s in range(10)])  # 4 epochs
    for epoch in range(4):
        assert sorted(labels[epoch * 10 : epoch * 10 + 10]) == list(range(10))
    assert list(labels[:10]) != list(labels[10:20])
    assert batcher.num_batches_per_epoch == 3


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_count_every_example_exactly_once(
    task_data_dir, stdlib_tokenizer, process_count
):
    cfg = TaskConfig(name="code_package", data_dir=task_data_dir, max_input_len=16, batch_size=16)
    ex = load_task(cfg, "validation")
    assert len(ex) % 16  # a partial last batch
    batcher = TaskBatcher(cfg, ex, stdlib_tokenizer, seed=0)
    batches = [
        [b for b in batcher.eval_batches(process_index=i, process_count=process_count)]
        for i in range(process_count)
    ]
    assert len(batches[0]) == batcher.num_batches_per_epoch == -(-len(ex) // 16)
    # Step by step, process slices in order: the global eval stream.
    steps = range(len(batches[0]))
    merged = {k: np.concatenate([p[s][k] for s in steps for p in batches]) for k in batches[0][0]}
    w = merged["example_weight"]
    assert w.sum() == len(ex) and (w[: len(ex)] == 1).all() and (w[len(ex) :] == 0).all()
    for i in range(len(ex)):
        row = example_row(batcher, i)
        for k in row:
            np.testing.assert_array_equal(merged[k][i], row[k], err_msg=k)
    assert (
        merged["segment_ids"][len(ex) :].sum(axis=1) > 0
    ).all()  # padding rows are real rows, weight 0
    assert len(list(batcher.eval_batches(2))) == 2
    with pytest.raises(ValueError, match="eval set holds"):
        list(batcher.eval_batches(batcher.num_batches_per_epoch + 1))


def test_glue_sst2_loads_through_mock_data(stdlib_tokenizer):
    cfg = TaskConfig(
        name="glue/sst2",
        kind="classification",
        input_key="sentence",
        batch_size=4,
        max_input_len=16,
    )
    with tfds.testing.mock_data(num_examples=6):
        ex = load_task(cfg, "train")
        assert len(ex) == 6 and ex.label_names == ["negative", "positive"] and ex.num_labels == 2
        assert isinstance(ex[0]["sentence"], str) and ex[0]["label"] in (0, 1)
        batches = list(TaskBatcher(cfg, ex, stdlib_tokenizer, seed=0).eval_batches())
        assert len(batches) == 2 and sum(b["example_weight"].sum() for b in batches) == 6
        match = "feature 'text' not in dataset 'glue/sst2'; available: idx, label, sentence"
        with pytest.raises(ValueError, match=match):
            load_task(TaskConfig(name="glue/sst2", kind="classification"), "train")
        with pytest.raises(ValueError, match="ClassLabel"):
            load_task(dataclasses.replace(cfg, label_key="idx"), "train")


def test_summarisation_dataset_loads_through_mock_data(stdlib_tokenizer):
    cfg = TaskConfig(
        name="cnn_dailymail",
        kind="text2text",
        input_key="article",
        target_key="highlights",
        batch_size=2,
        max_input_len=32,
        max_target_len=8,
    )
    with tfds.testing.mock_data(num_examples=3):
        ex = load_task(cfg, "validation")
        assert len(ex) == 3 and set(ex[0]) == {"article", "highlights"}
        b = TaskBatcher(cfg, ex, stdlib_tokenizer, seed=0).batch(1)
        assert b["encoder_inputs"].shape == (2, 32) and b["targets"].shape == (2, 8)


def test_unknown_or_unprepared_datasets_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
        load_task(
            TaskConfig(name="no_such_dataset_xyz", kind="text2text", data_dir=str(tmp_path)),
            "train",
        )
    cfg = TaskConfig(
        name="glue/sst2", kind="classification", input_key="sentence", data_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match="'glue/sst2' is not prepared in .*tfds build glue/sst2"):
        load_task(cfg, "train")


def test_out_of_range_labels_are_an_error(stdlib_tokenizer):
    class Labelled(list):
        num_labels = 2

    cfg = TaskConfig(name="code_package", batch_size=2)
    examples = Labelled([{"text": "a", "label": 1}, {"text": "b", "label": -1}])
    batcher = TaskBatcher(cfg, examples, stdlib_tokenizer, 0)
    with pytest.raises(ValueError, match=r"label -1 .* outside \[0, 2\)"):
        batcher.batch(0)


@pytest.mark.parametrize("name", ["code_package", "code_docstring", "code_completion"])
def test_batches_from_token_stores_equal_encoding_per_batch(
    task_data_dir, stdlib_tokenizer, tmp_path, name
):
    cfg = TaskConfig(
        name=name,
        data_dir=task_data_dir,
        max_input_len=48,
        max_target_len=12,
        batch_size=4,
        max_examples=40,
    )
    ex = load_task(cfg, "validation")
    fields = tokenize_task_fields(
        cfg, ex, stdlib_tokenizer, show_progress=False, log=lambda _: None
    )
    resolved = cfg.resolved()
    assert set(fields) == {k for k in (resolved.input_key, resolved.target_key) if k}
    stored = TaskBatcher(cfg, ex, stdlib_tokenizer, seed=3, token_fields=fields)
    encoded = TaskBatcher(cfg, ex, stdlib_tokenizer, seed=3)
    for step in (0, 11):  # 11: past one epoch of 40 examples
        a, b = stored.batch(step), encoded.batch(step)
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # tokenized once: a second call opens the same stores without encoding anything
    again = tokenize_task_fields(cfg, ex, stdlib_tokenizer, show_progress=False, log=pytest.fail)
    assert {k: s.root for k, s in again.items()} == {k: s.root for k, s in fields.items()}
