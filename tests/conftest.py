"""Every test runs on 8 simulated CPU devices so every sharding path is exercised.

XLA compiles go to a persistent compilation cache shared by the session and the processes its
tests start (the variables below are inherited), so the many Trainers that build the same tiny
step compile it once. The cache is new for each session unless JAXFORMER_TEST_XLA_CACHE names a
directory to reuse.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_cache = os.environ.get("JAXFORMER_TEST_XLA_CACHE") or tempfile.mkdtemp(prefix="jaxformer-xla-")
os.makedirs(_cache, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
# Tiny test programs compile in well under jax's default 1 s threshold: cache every one.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Processes the tests start get XLA's CPU buffers on huge pages as the entry points would
# (jaxformer/_malloc.py); set here, they need not re-execute themselves.
from jaxformer import _malloc  # noqa: E402 (after XLA_FLAGS; importing jaxformer imports no jax)

_hugepages = _malloc.hugepage_environment(os.environ)
if _hugepages is not None:
    os.environ["GLIBC_TUNABLES"] = _hugepages["GLIBC_TUNABLES"]
pytest_plugins = ["data_fixtures"]
