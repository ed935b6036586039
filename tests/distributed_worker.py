"""One process of a multi-process CPU training run (started by tests/test_distributed.py).

argv: coordinator_port num_processes process_id devices_per_process run_dir overrides...
"""

import json
import os
import sys


def main() -> None:
    port, num_processes, process_id, local_devices, run_dir = sys.argv[1:6]
    overrides = sys.argv[6:]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if int(num_processes) > 1:
        jax.distributed.initialize(
            f"127.0.0.1:{port}",
            int(num_processes),
            int(process_id),
            heartbeat_timeout_seconds=int(os.environ.get("JAXFORMER_TEST_HEARTBEAT", "100")),
        )
    from jaxformer.training.config import load_experiment
    from jaxformer.training.loop import Trainer

    cfg = load_experiment(None, overrides + [f"run.dir={run_dir}", "mesh.distributed=never"])
    trainer = Trainer(cfg, show_progress=False, log=lambda _: None)
    pause = float(os.environ.get("JAXFORMER_TEST_STEP_SLEEP", "0"))
    if pause:  # slow steps down, so a test can kill a process in the middle of the run
        import time

        step_fn = trainer.train_step
        trainer.train_step = lambda *args: (time.sleep(pause), step_fn(*args))[1]
    until = os.environ.get("JAXFORMER_TEST_UNTIL")  # stop (and checkpoint) after this step
    result = trainer.run(until=int(until) if until else None)
    trainer.close()
    # Only process 0 writes metrics.jsonl; each host prints its own, to be compared across hosts.
    print("validation " + json.dumps(result["validation"]), flush=True)
    print(
        f"process {jax.process_index()} of {jax.process_count()} done on "
        f"{jax.device_count()} devices",
        flush=True,
    )


if __name__ == "__main__":
    main()
