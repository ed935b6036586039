"""Two processes (jax.distributed on CPU, gloo) train like one, each loading only its own rows;
a run resumed on other device and process counts continues exactly."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run_overrides(tmp_path, data_dir, tokenizer, steps: int, *extra: str) -> list[str]:
    """The settings every multi-process test run shares (gpt-tiny, 8 rows of 32 tokens, a log
    line per step, synchronous saves, data parallel), the tokenizer saved under tmp_path."""
    tokenizer_path = str(tmp_path / "tok.model")
    tokenizer.save(tokenizer_path)
    return [
        "model.preset=gpt-tiny",
        f"data.data_dir={data_dir}",
        f"data.tokenizer_path={tokenizer_path}",
        "data.seq_len=32",
        "data.batch_size=8",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "optimizer.warmup_steps=1",
        "checkpoint.async_save=false",
        "mesh.shape=[-1,1,1]",
        *extra,
    ]


def _start(num_processes, devices_each, run_dir, overrides, **env_extra):
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **{k: str(v) for k, v in env_extra.items()},
    )
    return [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                str(port),
                str(num_processes),
                str(i),
                str(devices_each),
                run_dir,
                *overrides,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(num_processes)
    ]


def _launch(num_processes, devices_each, run_dir, overrides, until=None):
    extra = {} if until is None else {"JAXFORMER_TEST_UNTIL": until}
    procs = _start(num_processes, devices_each, run_dir, overrides, **extra)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def _validation(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == "validation"}


def _printed_validation(outputs):
    """Each process's own final validation metrics, as the worker prints them."""
    return [
        json.loads(line.split(" ", 1)[1])
        for out in outputs
        for line in out.splitlines()
        if line.startswith("validation ")
    ]


@pytest.mark.slow
def test_resuming_on_fewer_devices_and_more_processes_sees_the_same_batches(
    stdlib_data_dir, stdlib_tokenizer, tmp_path
):
    """8 devices -> 4 devices -> 2 processes x 2 devices, from a multi-shard token store: the
    global batches (hence the losses) are the uninterrupted run's at every step, and the final
    validation (bits per byte, unigram baseline) counts every process's rows, on every host."""
    overrides = tiny_run_overrides(
        tmp_path,
        stdlib_data_dir,
        stdlib_tokenizer,
        4,
        "data.docs_per_shard=100",
        f"data.tokens_dir={tmp_path / 'tokens'}",
        "checkpoint.every=100",
    )
    single = str(tmp_path / "single")
    _launch(1, 8, single, overrides)
    moved = str(tmp_path / "moved")
    _launch(1, 8, moved, overrides, until=1)
    _launch(1, 4, moved, overrides, until=2)
    outputs = _launch(2, 2, moved, overrides)  # two processes, each loading only its rows
    assert any("process 1 of 2 done on 4 devices" in out for out in outputs), outputs
    expected, got = _losses(single), _losses(moved)
    assert sorted(got) == [1, 2, 3, 4]
    for step in expected:  # other device counts reduce in another order: float rounding only
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)

    # Validation totals (bytes, unigram log-probabilities) are summed over both processes before
    # dividing: the same figures as one process over all the rows, and the same on both hosts.
    hosts = _printed_validation(outputs)
    assert len(hosts) == 2 and hosts[0] == hosts[1], hosts
    one, two = _validation(single)[4], _validation(moved)[4]
    assert two["unigram_loss"] == pytest.approx(one["unigram_loss"], rel=1e-6)
    assert two["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=1e-6)
    # bytes per target token: a property of the validation rows alone, free of float rounding
    assert two["loss"] / two["bits_per_byte"] == pytest.approx(
        one["loss"] / one["bits_per_byte"], rel=1e-6
    )
    assert hosts[0]["bits_per_byte"] == two["bits_per_byte"]


@pytest.mark.slow
def test_killing_one_process_stops_the_other_and_rerunning_both_resumes(
    stdlib_data_dir, stdlib_tokenizer, tmp_path
):
    overrides = tiny_run_overrides(
        tmp_path,
        stdlib_data_dir,
        stdlib_tokenizer,
        6,
        "checkpoint.every=2",
        "train.sample_prompt=''",
    )
    reference = str(tmp_path / "reference")
    _launch(2, 2, reference, overrides)

    killed = str(tmp_path / "killed")
    procs = _start(
        2, 2, killed, overrides, JAXFORMER_TEST_HEARTBEAT=5, JAXFORMER_TEST_STEP_SLEEP=1.0
    )
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(killed, "checkpoints", "2")):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            outputs = [p.communicate()[0][-3000:] for p in procs]
            raise AssertionError(f"step 2 was never saved; process outputs: {outputs}")
        time.sleep(0.2)
    procs[1].kill()  # SIGKILL: no handler runs, as when a host dies
    started = time.time()
    survivor = procs[0].communicate(timeout=240)[0]
    procs[1].communicate()
    assert procs[0].returncode != 0
    assert "another task died" in survivor, survivor[-3000:]
    assert time.time() - started < 120  # detected by the heartbeat, not a hang

    _launch(2, 2, killed, overrides)  # rerun both: resumes from the last checkpoint
    expected, got = _losses(reference), _losses(killed)
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # same processes and devices: bit for bit
