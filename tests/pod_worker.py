"""tests/distributed_worker.py with one host's view of the run directory narrowed (started by
tests/test_pod_faults.py): with JAXFORMER_TEST_HIDE_STEP=S, process 1 sees no checkpoint at step S,
as when a step is missing from that host's disk or not yet visible to it. Prints the step each
process resumed from."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[4]}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jaxformer.training import checkpoint as ckpt_lib
    from jaxformer.training.loop import Trainer

    hidden = int(os.environ.get("JAXFORMER_TEST_HIDE_STEP", "-1"))
    if sys.argv[3] == "1" and hidden >= 0:
        steps, problem = ckpt_lib.Checkpointer.steps, ckpt_lib.Checkpointer._commit_problem
        ckpt_lib.Checkpointer.steps = property(
            lambda self: [s for s in steps.fget(self) if s != hidden]
        )
        ckpt_lib.Checkpointer._commit_problem = lambda self, step: (
            "its directory is missing on this host" if step == hidden else problem(self, step)
        )
    run = Trainer.run

    def run_and_say(self, *args, **kwargs):
        print(f"resumed from step {self.start_step}", flush=True)
        return run(self, *args, **kwargs)

    Trainer.run = run_and_say
    import distributed_worker

    distributed_worker.main()


if __name__ == "__main__":
    main()
