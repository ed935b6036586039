"""Every test runs on 8 simulated CPU devices so every sharding path is exercised."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
pytest_plugins = ["data_fixtures"]
