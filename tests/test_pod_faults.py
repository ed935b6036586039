"""Faults of multi-host runs, with two processes on this machine (jax.distributed on CPU)."""

import json
import os

import pytest
from test_distributed import _start, tiny_run_overrides

POD_WORKER = os.path.join(os.path.dirname(__file__), "pod_worker.py")


@pytest.mark.slow
def test_hosts_agree_on_the_step_to_restore_when_one_host_cannot_see_the_newest(
    stdlib_data_dir, stdlib_tokenizer, tmp_path, monkeypatch
):
    """Process 1 cannot see step 4 (missing from its view), process 0 can: both resume from
    step 2 (never one from each), the lead sets step 4 aside, and steps 3 and 4 come out again
    bit for bit."""
    import test_distributed

    monkeypatch.setattr(test_distributed, "WORKER", POD_WORKER)
    overrides = tiny_run_overrides(
        tmp_path,
        stdlib_data_dir,
        stdlib_tokenizer,
        6,
        "checkpoint.every=2",
        "train.sample_prompt=''",
    )
    run_dir = str(tmp_path / "run")

    def launch(**env):
        procs = _start(2, 2, run_dir, overrides, **env)
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [out[-3000:] for out in outputs]
        return outputs

    launch(JAXFORMER_TEST_UNTIL=4)  # checkpoints at steps 2 and 4
    outputs = launch(JAXFORMER_TEST_HIDE_STEP=4)
    resumed = [line for out in outputs for line in out.splitlines() if "resumed from" in line]
    assert resumed == ["resumed from step 2", "resumed from step 2"], outputs
    assert "the checkpoint at step 4" in outputs[0] and "resuming from step 2" in outputs[0]
    assert os.listdir(os.path.join(run_dir, "checkpoints", "corrupt"))  # set aside, not deleted
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert train[2]["loss"] == train[4]["loss"] and train[3]["loss"] == train[5]["loss"]


@pytest.mark.slow
def test_two_hosts_started_together_on_a_fresh_run_directory_agree_it_is_new(
    stdlib_data_dir, stdlib_tokenizer, tmp_path
):
    """As every pod starts: both processes launched at once on a directory that does not exist
    yet, twice. Each time both train from step 0 and finish (before the one-decision rule, one in
    two such starts crashed both: a host saw the directory its peer had just created, took the
    resume path, and orbax's collectives mismatched)."""
    overrides = tiny_run_overrides(
        tmp_path, stdlib_data_dir, stdlib_tokenizer, 1, "train.sample_prompt=''"
    )
    for attempt in range(2):
        run_dir = str(tmp_path / f"fresh-{attempt}")
        procs = _start(2, 2, run_dir, overrides)
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [out[-3000:] for out in outputs]
        assert all("done on 4 devices" in out for out in outputs), outputs
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            assert [r["step"] for r in map(json.loads, f) if r["split"] == "train"] == [1]
