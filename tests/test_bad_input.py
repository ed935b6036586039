"""Bad input at every entry point: one `error:` line and status 2, checked before any work, with
nothing already saved lost; Ctrl-C; reruns of existing runs. The rows of docs/reliability.md."""

import errno
import importlib.util
import json
import os
import shutil
import signal
import sys

import pytest
import tensorflow_datasets as tfds
from data_fixtures import TINY_RUN, snapshot

from jaxformer.training import cli
from jaxformer.training.checkpoint import Checkpointer
from jaxformer.training.config import load_experiment
from jaxformer.training.loop import PREEMPTED_EXIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    """The main() of a command-line script at the repository root (train.py, ...)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _convert(argv):
    from jaxformer.convert.__main__ import main

    return main(argv)


def _one_error_line(err):
    """The message line of stderr, checked to be the only one besides progress bars."""
    lines = [
        line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def run_overrides(stdlib_data_dir, stdlib_tokenizer, tmp_path_factory):
    """TINY_RUN on the stdlib corpus, its tokenizer in a module-wide directory."""
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    stdlib_tokenizer.save(path)
    return TINY_RUN + [
        f"data.data_dir={stdlib_data_dir}",
        f"data.tokenizer_path={path}",
        f"data.vocab_size={stdlib_tokenizer.vocab_size}",
        "train.sample_prompt=''",
        "checkpoint.every=1",
    ]


@pytest.fixture(scope="module")
def finished_run(run_overrides, tmp_path_factory):
    """A finished 2-step run (checkpoints at steps 1 and 2); copy it before changing it."""
    from jaxformer.training.main import run_training

    run_dir = str(tmp_path_factory.mktemp("finished") / "run")
    assert run_training(None, run_overrides + ["train.steps=2", f"run.dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    path = str(tmp_path / "run")
    shutil.copytree(finished_run, path)
    return path


# ------------------------------------------------------------------ 1. one way to fail, everywhere


def _bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: [1,\n")
    return str(path)


def _not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"train:\n  steps: 3  # caf\xe9\n")
    return str(path)


ENTRY_POINT_CASES = {
    "train: malformed YAML": (
        lambda t: _script("train.py")(["--config", _bad_yaml(t)]),
        "malformed YAML",
    ),
    "train: config not UTF-8": (
        lambda t: _script("train.py")(["--config", _not_utf8(t)]),
        "not valid UTF-8",
    ),
    "train: missing config file": (
        lambda t: _script("train.py")(["--config", str(t / "nope.yaml")]),
        "not found",
    ),
    "train: unknown key": (
        lambda t: _script("train.py")(["train.stesp=3"]),
        "did you mean 'train.steps'",
    ),
    "train: wrong type": (
        lambda t: _script("train.py")(["train.steps=abc"]),
        "train.steps: expected int",
    ),
    "compile-only: unknown topology": (
        lambda t: _script("train.py")(["--compile-only", "--topology", "v99:2x2"]),
        "unknown TPU topology",
    ),
    "finetune: no checkpoint dir": (
        lambda t: _script("finetune.py")(["--from", str(t / "missing")]),
        "no checkpoints in",
    ),
    "eval: no checkpoint dir": (
        lambda t: _script("eval.py")([str(t / "missing")]),
        "no checkpoints in",
    ),
    "convert to-hf: no checkpoint dir": (
        lambda t: _convert(["to-hf", str(t / "missing"), str(t / "out")]),
        "no checkpoints in",
    ),
    "convert from-hf: not a directory": (
        lambda t: _convert(["from-hf", str(t / "missing"), str(t / "run")]),
        "not a directory",
    ),
}


@pytest.mark.parametrize("case", list(ENTRY_POINT_CASES))
def test_every_entry_point_ends_bad_input_with_one_line_and_status_2(case, tmp_path, capsys):
    call, message = ENTRY_POINT_CASES[case]
    assert call(tmp_path) == cli.BAD_INPUT_EXIT
    assert message in _one_error_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == sorted(
        p for p in os.listdir(tmp_path) if p.endswith(".yaml")
    )  # nothing created


INTERRUPT_POINTS = {  # (entry point, argv, the module attribute called first)
    "train": ("train.py", [], "jaxformer.training.config.load_experiment"),
    "finetune": ("finetune.py", ["--from", "x"], "jaxformer.training.finetune.load_finetune"),
    "eval": ("eval.py", ["x"], "jaxformer.training.evaluate.open_run"),
    "convert": (None, ["to-hf", "x", "y"], "jaxformer.convert.peft.is_lora_run"),
}


@pytest.mark.parametrize("entry", list(INTERRUPT_POINTS))
def test_ctrl_c_outside_the_training_loop_is_one_line_and_status_130(entry, monkeypatch, capsys):
    script, argv, target = INTERRUPT_POINTS[entry]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    main = _convert if script is None else _script(script)
    assert main(argv) == cli.INTERRUPTED_EXIT
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C)"), err
    if entry in ("train", "finetune"):
        assert "rerun the same command" in err


@pytest.mark.parametrize(
    "code, expected",
    [
        (errno.ENOSPC, "No space left on device: '/runs/x/config.yaml'; the disk is full"),
        (errno.EROFS, "Read-only file system: '/runs/x/config.yaml'; the file system is read-only"),
        (errno.EACCES, "Permission denied: '/runs/x/config.yaml'; check that path's permissions"),
        (errno.EIO, None),  # a hardware fault is no user error: it keeps its traceback
    ],
)
def test_os_errors_that_are_user_errors(code, expected):
    message = cli.describe(OSError(code, os.strerror(code), "/runs/x/config.yaml"))
    if expected is None:
        assert message is None
    else:
        assert message.startswith(expected), message


@pytest.mark.parametrize("entry", ["train", "finetune", "eval"])
def test_unreadable_checkpoint_is_one_line(
    entry, finished_run, run_overrides, tmp_path, monkeypatch, capsys
):
    """Permission denied reading a checkpoint (simulated: tests run as root, which reads any
    file): status 2 naming the path, and nothing written."""
    path = os.path.join(finished_run, "checkpoints", "2")

    def unreadable(self, step=None):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(Checkpointer, "read_meta", unreadable)
    before = snapshot(finished_run)
    argv = {
        "train": [f"run.dir={finished_run}"] + run_overrides,
        "finetune": ["--from", finished_run, f"run.dir={tmp_path / 'ft'}"],
        "eval": [finished_run],
    }[entry]
    assert _script(f"{entry}.py")(argv) == 2
    assert f"Permission denied: '{path}'" in _one_error_line(capsys.readouterr().err)
    assert snapshot(finished_run) == before and not os.path.exists(tmp_path / "ft")


def test_a_bug_keeps_its_traceback():
    @cli.command()
    def buggy():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        buggy()


def test_finetune_checks_its_config_before_reading_task_data(
    finished_run, tmp_path, monkeypatch, capsys
):
    import jaxformer.training.finetune as finetune

    def never(*args, **kwargs):
        raise AssertionError("task data read before the config was checked")

    monkeypatch.setattr(finetune, "load_task", never)
    main, run = _script("finetune.py"), f"run.dir={tmp_path / 'ft'}"
    cases = [
        (
            ["--config", os.path.join(ROOT, "configs", "finetune", "code_package.yaml"), run],
            "needs a model of family 'encoder'",
        ),
        (
            ["task.name=code_completion", "train.steps=5", run],
            "optimizer.warmup_steps=10 exceeds train.steps=5",
        ),
        (
            ["task.name=code_completion", "task.max_input_len=512", run],
            "task.max_input_len=512 exceeds model.max_len=128",
        ),
    ]
    for argv, message in cases:
        assert main(["--from", finished_run] + argv) == 2
        assert message in _one_error_line(capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "ft")


# ------------------------------------------------------------------ 2. eval: optional packages


def test_eval_plot_without_matplotlib_fails_before_evaluating(
    finished_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    import jaxformer.training.evaluate as evaluate

    def never(*args, **kwargs):
        raise AssertionError("evaluated before checking --plot")

    monkeypatch.setattr(evaluate, "open_run", never)
    out = tmp_path / "report.json"
    assert (
        evaluate.run_eval(finished_run, None, None, str(out), plot=True, prompt=None, int8=True)
        == 2
    )
    line = _one_error_line(capsys.readouterr().err)
    assert "--plot needs the matplotlib package: pip install -e '.[plot]'" in line
    assert not out.exists()


def test_eval_writes_the_report_before_a_plot_that_fails(
    finished_run, tmp_path, monkeypatch, capsys
):
    import jaxformer.training.evaluate as evaluate

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "curves.png")

    monkeypatch.setattr(evaluate, "plot_curves", disk_full)
    monkeypatch.setattr(evaluate, "generate_text", lambda trainer, prompt, *a: " pass")
    out = tmp_path / "report.json"
    assert (
        evaluate.run_eval(finished_run, None, None, str(out), plot=True, prompt="x", num_batches=1)
        == 2
    )
    assert "No space left on device" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["step"] == 2 and "loss" in report["metrics"] and report["samples"]


def test_eval_out_in_a_missing_directory_fails_before_evaluating(finished_run, tmp_path, capsys):
    out = tmp_path / "no" / "report.json"
    assert _script("eval.py")([finished_run, "--out", str(out)]) == 2
    assert "--out: no such directory" in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------ 3. reruns with other settings


@pytest.mark.parametrize(
    "changes, keys",
    [
        (
            ["data.batch_size=16", "optimizer.learning_rate=1.0"],
            ["data.batch_size 8 -> 16", "optimizer.learning_rate 0.0003 -> 1.0"],
        ),
        (["data.vocab_size=512"], ["data.vocab_size 1024 -> 512"]),  # was ignored, yet recorded
        (["train.seed=1", "model.dropout_rate=0.1"], ["train.seed 0 -> 1", "model.dropout_rate"]),
        (["train.steps=1"], ["train.steps=1 is below step 2"]),
    ],
)
def test_rerun_with_settings_that_change_the_run_is_refused(
    run_copy, run_overrides, changes, keys, capsys
):
    from jaxformer.training.main import run_training

    before = snapshot(run_copy)
    assert run_training(None, run_overrides + [f"run.dir={run_copy}"] + changes) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert all(k in line for k in keys), line
    assert "new run.dir" in line
    assert snapshot(run_copy) == before  # config.yaml, checkpoints, metrics untouched


def test_rerun_extending_the_run_reports_the_changes_and_records_them(
    run_copy, run_overrides, capsys
):
    from jaxformer.training.main import run_training

    """A rerun that extends the run trains on and records the changed settings. The last line of
    metrics.jsonl was torn by a kill in mid-write: it is set aside (one line says so), so the
    resumed run's first record starts a line of its own and every line reads."""
    from jaxformer.training.metrics import read_metrics

    path = os.path.join(run_copy, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 3, "split": "tra')
    changes = ["train.steps=3", "train.log_every=2", "model.attention_impl=plain"]
    assert run_training(None, run_overrides + [f"run.dir={run_copy}"] + changes) == 0
    out = capsys.readouterr().out
    assert "metrics.jsonl ended in an unfinished line (25 bytes" in out
    assert [r["step"] for r in read_metrics(run_copy) if r["split"] == "train"] == [1, 2, 3]
    with open(path + ".torn") as f:
        assert f.read() == '{"step": 3, "split": "tra\n'
    assert (
        "[resume] settings changed since the checkpoint: model.attention_impl 'auto' -> "
        "'plain', train.steps 2 -> 3, train.log_every 1 -> 2; config.yaml now records them"
    ) in out
    assert "[done] trained to step 3 (1 step in" in out
    recorded = load_experiment(os.path.join(run_copy, "config.yaml"))
    assert (recorded.train.steps, recorded.train.log_every, recorded.model.attention_impl) == (
        3,
        2,
        "plain",
    )
    assert Checkpointer(run_copy, create=False).latest_step == 3


# ------------------------------------------------------------------ 4. whole config checked first


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.steps=20"], "optimizer.warmup_steps=50 exceeds train.steps=20"),
        (["data.seq_len=256"], "data.seq_len=256 exceeds model.max_len=128"),
        (["data.objective=span_corruption"], "set data.objective=auto"),
        (
            ["data.tokenizer_path=/no/such.model"],
            "data.tokenizer_path='/no/such.model' is not a file",
        ),
        (
            ["optimizer.schedule=warmup_stable_decay", "optimizer.warmup_steps=590"],
            "set optimizer.warmup_steps=<=540",
        ),
        (["model.preset=t5-tiny", "data.target_len=2"], "raise data.target_len"),
        (["model.num_heads=0"], "model.num_heads=0: must be >= 1"),  # was a ZeroDivisionError
        (["model.num_layers=0"], "model.num_layers=0: must be >= 1"),  # failed at the first save
        (["data.batch_size=0"], "data.batch_size=0: must be >= 1"),  # after data preparation
        # Was 13 GB and 12 minutes into building batch 1 before anything said so.
        (["data.batch_size=10000000000"], "of host memory, "),
    ],
)
def test_the_whole_config_is_checked_before_any_work(overrides, message, tmp_path, capsys):
    """As a new user: `python train.py train.steps=20` on the default config (its data dir never
    touched, no tokenizer trained, no run directory made)."""
    from jaxformer.training.main import run_training

    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    default = os.path.join(ROOT, "configs", "default.yaml")
    status = run_training(default, overrides + [f"run.dir={run_dir}", f"data.data_dir={data_dir}"])
    assert status == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_a_batch_larger_than_host_memory_is_refused_naming_the_sizes(monkeypatch):
    import jaxformer.training.config as config_lib

    monkeypatch.setattr(config_lib, "available_memory", lambda: 3 * 2**20)
    overrides = ["data.batch_size=512", "data.seq_len=128", "data.prefetch=4"]
    with pytest.raises(ValueError) as raised:
        load_experiment(None, overrides)
    # 512 rows x 5 arrays x 128 x 4 bytes = 1.25 MiB; 6 batches alive at once.
    assert str(raised.value) == (
        "data.batch_size=512 (data.seq_len=128): one batch takes 1.2 MiB of host memory, "
        "7.5 MiB with data.prefetch=4 batches made ahead, but this host has 3.0 MiB available; "
        "lower data.batch_size (e.g. data.batch_size=102) or data.prefetch"
    )
    load_experiment(None, overrides[:2] + ["data.prefetch=0"])  # 2.5 MiB: fits


def test_an_empty_sample_prompt_from_the_shell_skips_the_sample():
    """`train.sample_prompt=''` reaches Python as `train.sample_prompt=` (an empty YAML value)."""
    for item in ("train.sample_prompt=", "train.sample_prompt=''"):
        assert load_experiment(None, [item]).train.sample_prompt == ""


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("", "--generate needs a non-empty prompt"),
        # What Python makes of the bytes b"caf\xe9" on the command line (surrogate escapes).
        (os.fsdecode(b"caf\xe9"), "--generate: the prompt is not valid UTF-8"),
    ],
)
def test_eval_refuses_a_bad_prompt_before_evaluating(
    prompt, message, finished_run, monkeypatch, capsys
):
    import jaxformer.training.evaluate as evaluate

    def never(*args, **kwargs):
        raise AssertionError("evaluated before checking --generate")

    monkeypatch.setattr(evaluate, "open_run", never)
    assert _script("eval.py")([finished_run, "--generate", prompt]) == 2
    assert message in _one_error_line(capsys.readouterr().err)


def test_warmup_message_names_the_override():
    with pytest.raises(
        ValueError,
        match=r"optimizer.warmup_steps=50 exceeds train.steps=20 .*; "
        r"set optimizer.warmup_steps=<=20",
    ):
        load_experiment(os.path.join(ROOT, "configs", "default.yaml"), ["train.steps=20"])


def test_mesh_too_big_for_the_cpu_says_how_to_simulate_devices(run_overrides, tmp_path, capsys):
    from jaxformer.training.main import run_training

    assert (
        run_training(None, run_overrides + ["mesh.shape=[4,4,1]", f"run.dir={tmp_path / 'run'}"])
        == 2
    )
    line = _one_error_line(capsys.readouterr().err)
    assert "needs 16 devices" in line
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=16" in line
    assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ 5. rerun of a finished run


def test_rerun_of_a_finished_run_says_so_and_reports_validation(run_copy, run_overrides, capsys):
    from jaxformer.training.main import run_training

    before = Checkpointer(run_copy, create=False).steps
    assert run_training(None, run_overrides + [f"run.dir={run_copy}", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "was already complete at step 2 (train.steps=2): no training done" in out
    assert "[done] validation loss" in out and "[done] trained to step" not in out
    assert Checkpointer(run_copy, create=False).steps == before


# ------------------------------------------------------------------ full disk, read-only run dir


def _raise_oserror(code):
    def fail(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), path)

    return fail


def test_full_disk_while_checkpointing_keeps_earlier_checkpoints(
    run_overrides, tmp_path, monkeypatch, capsys
):
    """ENOSPC at the step-2 save: exit 2 naming the disk, the step-1 checkpoint intact."""
    from jaxformer.training import checkpoint as ckpt_lib
    from jaxformer.training.main import run_training

    run_dir = str(tmp_path / "run")
    save = ckpt_lib.Checkpointer.save

    def save_until_full(self, step, *args, **kwargs):
        if step >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoints/2")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_until_full)
    overrides = run_overrides + ["train.steps=3", f"run.dir={run_dir}"]
    assert run_training(None, overrides) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "checkpoints already written are intact" in line
    assert Checkpointer(run_dir, create=False).steps == [1]

    # Then a read-only file system while config.yaml is rewritten: refused, nothing lost.
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    import jaxformer.config as config_lib

    monkeypatch.setattr(config_lib, "open", _raise_oserror(errno.EROFS), raising=False)
    before = snapshot(run_dir)
    assert run_training(None, overrides) == 2
    assert "Read-only file system" in _one_error_line(capsys.readouterr().err)
    assert snapshot(run_dir) == before

    assert Checkpointer(run_dir, create=False).read_meta()["step"] == 1  # still resumable


# What TensorStore raised in the background thread when a real tmpfs filled up during a save.
TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "0.blocks.mlp.kernel/0.4.0.0" in OCDBT database at local '
    'file "{d}/": Failed writing: "{d}/d/79cbe7": Failed to write 31824 bytes to file 12: No '
    "space left on device [os_error_code='28']"
)


@pytest.mark.parametrize("raised", ["OSError", "TensorStore"])
def test_full_disk_in_a_background_save_is_one_line(
    raised, run_overrides, tmp_path, monkeypatch, capfd, caplog
):
    """ENOSPC inside orbax's asynchronous save thread (injected where it commits): one `error:`
    line naming the disk, none of orbax's logged tracebacks, the earlier checkpoint intact."""
    from orbax.checkpoint._src.path import atomicity

    from jaxformer.training.main import run_training

    run_dir = str(tmp_path / "run")
    commits = []
    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        original = cls.finalize

        async def finalize(self, *args, _original=original, **kwargs):
            if "checkpoints/2" not in str(getattr(self, "_final_path", "")):
                return await _original(self, *args, **kwargs)
            commits.append(self)
            where = os.path.join(run_dir, "checkpoints", "2.orbax-checkpoint-tmp")
            if raised == "OSError":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
            raise ValueError(TENSORSTORE_ENOSPC.format(d=where))

        monkeypatch.setattr(cls, "finalize", finalize)
    overrides = ["train.steps=3", "checkpoint.async_save=true", f"run.dir={run_dir}"]
    assert run_training(None, run_overrides + overrides) == 2
    assert commits  # the fault was injected where orbax commits, in the background
    err = capfd.readouterr().err
    line = _one_error_line(err)
    assert line.startswith("error: No space left on device: '") and "the disk is full" in line
    assert not [r for r in caplog.records if r.levelno >= 40], caplog.records
    assert Checkpointer(run_dir, create=False).steps == [1]


# ------------------------------------------------------------------ 6. Ctrl-C inside the loop


def test_ctrl_c_while_training_saves_and_says_how_to_resume(
    run_overrides, tmp_path, monkeypatch, capsys
):
    """In-process SIGINT (as Ctrl-C sends) during the first logged step: status 75, a checkpoint
    of that step, and the message says to rerun the command."""
    from jaxformer.training import metrics as metrics_lib
    from jaxformer.training.main import run_training

    write, sent = metrics_lib.MetricsWriter.write, []

    def write_then_ctrl_c(self, *args, **kwargs):
        write(self, *args, **kwargs)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write_then_ctrl_c)
    run_dir = str(tmp_path / "run")
    assert (
        run_training(
            None, run_overrides + ["train.steps=50", "checkpoint.every=100", f"run.dir={run_dir}"]
        )
        == PREEMPTED_EXIT
    )
    err = capsys.readouterr().err
    saved = Checkpointer(run_dir, create=False).latest_step
    assert saved is not None and f"SIGINT: saved a checkpoint at step {saved}" in err
    assert "rerun the same command to resume" in err and "Traceback" not in err


# ------------------------------------------------------------------ corpus with invalid UTF-8


class BadUtf8Corpus(tfds.core.GeneratorBasedBuilder):
    """40 small code documents per split; one of them is Latin-1, not UTF-8."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples("train"),
            "validation": self._generate_examples("validation"),
        }

    def _generate_examples(self, split):
        for i in range(40):
            text = (f"def f(x):\n    return x + {i}\n" * 20).encode()
            yield f"{split}{i}", {"text": b"caf\xe9 \xff\n" * 10 if i == 3 else text}


def test_tfds_corpus_with_a_document_that_is_not_utf8(run_overrides, tmp_path, capsys):
    """Ends with one line naming the problem (status 2): never a traceback, never a half-written
    run."""
    from jaxformer.training.main import run_training

    data_dir = str(tmp_path / "tfds")
    BadUtf8Corpus(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    capsys.readouterr()
    run_dir = str(tmp_path / "run")
    status = run_training(
        None,
        run_overrides
        + [
            "data.dataset=bad_utf8_corpus",
            f"data.data_dir={data_dir}",
            "train.steps=1",
            f"run.dir={run_dir}",
        ],
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Documents are decoded strictly (corpus.python_value) while the token store is built.
    assert status == 2
    assert "not valid UTF-8" in _one_error_line(err)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


def test_convert_without_the_hf_extra_names_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("torch", "transformers") else real(name, *a),
    )
    assert _convert(["from-hf", str(tmp_path), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs the torch package: pip install -e '.[hf]'" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ one writer per run directory


def test_a_second_writer_is_refused_and_readers_still_work(
    run_copy, run_overrides, monkeypatch, capsys
):
    """While a run is being written (its lock held, as a training process holds it), another
    train.py on it exits 2 naming the holder and changes nothing; eval.py reads it meanwhile."""
    import socket

    import jaxformer.training.evaluate as evaluate
    from jaxformer.training.main import run_training
    from jaxformer.training.run_lock import RunLock

    lock = RunLock(run_copy)
    try:
        before = snapshot(run_copy)
        assert run_training(None, run_overrides + [f"run.dir={run_copy}", "train.steps=3"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"being written by process {os.getpid()} on host {socket.gethostname()}" in line
        assert snapshot(run_copy) == before
        monkeypatch.setattr(evaluate, "generate_text", lambda trainer, prompt, *a: " pass")
        assert _script("eval.py")([run_copy, "--batches", "1"]) == 0
        assert "loss" in capsys.readouterr().out
    finally:
        lock.release()
    assert not os.path.exists(os.path.join(run_copy, "run.lock"))


# ------------------------------------------------------------------ metrics.jsonl


def test_a_bad_metrics_line_is_named_before_evaluating(run_copy, capsys):
    path = os.path.join(run_copy, "metrics.jsonl")
    with open(path) as f:
        lines = f.readlines()
    lines.insert(1, "garbage\n")
    with open(path, "w") as f:
        f.writelines(lines)
    assert _script("eval.py")([run_copy, "--plot"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{path}, line 2: not a JSON record" in line
