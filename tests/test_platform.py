"""On a host with libtpu but no TPU, jaxformer keeps libtpu's spurious start-up error off stderr."""

import os
import subprocess
import sys

import pytest

from jaxformer import _platform

LIBTPU_LINE = "TPU_WORKER_HOSTNAMES"


@pytest.mark.skipif(not _platform.libtpu_installed(), reason="libtpu not installed (tpu extra)")
@pytest.mark.skipif(
    _platform.accelerator_possible(), reason="this host may have a TPU or GPU: JAX must probe"
)
@pytest.mark.parametrize(
    "code",
    [
        "import jaxformer.training.main, jax; print(jax.devices())",
        # jax first: its config has already read the environment when jaxformer is imported
        "import jax, jaxformer; print(jax.devices())",
    ],
)
def test_no_libtpu_error_without_tpu(code):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
    # Another process here (this pytest, if it compiled for a TPU topology) may hold libtpu's lock;
    # libtpu would then stop quietly before the error line and the test would pass unfixed.
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert LIBTPU_LINE not in proc.stderr, proc.stderr
    assert "CpuDevice" in proc.stdout


def test_users_choice_and_accelerators_are_left_alone(monkeypatch):
    monkeypatch.setattr(_platform, "libtpu_installed", lambda environ: True)
    monkeypatch.setattr(_platform, "accelerator_possible", lambda: False)
    for chosen in ({"JAX_PLATFORMS": ""}, {"JAX_PLATFORMS": "tpu"}, {"JAX_FORCE_TPU_INIT": "1"}):
        env = dict(chosen)
        assert not _platform.skip_tpu_probe(env) and env == chosen
    monkeypatch.setattr(_platform, "accelerator_possible", lambda: True)
    env = {}
    assert not _platform.skip_tpu_probe(env) and env == {}
