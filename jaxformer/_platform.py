"""Keeps JAX from probing for a TPU on hosts that have none, so libtpu prints nothing there.

With libtpu installed (the `tpu` extra), JAX's default backend search loads libtpu on every host.
Off a TPU VM, libtpu then writes an alarming error to stderr before JAX falls back to the CPU:

    E0000 ... common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker hostname 'WARNING:
    could not determine TPU worker hostnames or IP addresses' from env var TPU_WORKER_HOSTNAMES...

and it contends for /tmp/libtpu_lockfile with other libtpu users. No log level silences it
(libtpu writes it before its logging starts), and faking TPU_WORKER_HOSTNAMES would make
sharding.maybe_initialize_distributed think the host is part of a multi-host slice. So where a
TPU is impossible -- no TPU device files, no TPU on the PCI bus, and no GPU either (JAX would need
its GPU plugin tried) -- the CPU is named as the platform, exactly what JAX would have ended with.
Anything the user chose wins: JAX_PLATFORMS set (even to "", JAX's "search everything") or
JAX_FORCE_TPU_INIT. Compile-only TPU devices (training/compile_only.py) are made by libtpu
directly, not by the backend search, so they work as before.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from collections.abc import MutableMapping

# Google's PCI vendor id and the device ids of its TPU chips (as listed in jax._src.hardware_utils,
# jax 0.10). Google's other PCI devices (gVNIC, NVMe) sit on every GCE VM, so the vendor alone
# says nothing.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
# TPU VMs expose their chips as /dev/accel* (v2-v4) or VFIO groups (v5e and later); containers on
# them get these files even where /sys shows no PCI bus. Any /dev/vfio counts: when in doubt, a
# TPU might be there and JAX must look for it.
_TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio")
# NVIDIA (native, containers, WSL2) and AMD (ROCm) device files.
_GPU_DEVICE_FILES = ("/dev/nvidia*", "/dev/dxg", "/dev/kfd")


def _exists(patterns: tuple[str, ...]) -> bool:
    return any(glob.glob(p) for p in patterns)


def _tpu_on_pci_bus() -> bool:
    for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_file) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor_file), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def libtpu_installed(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether JAX's backend search would load libtpu (the pip package or TPU_LIBRARY_PATH)."""
    return bool(environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def accelerator_possible() -> bool:
    """Whether this host may have a TPU or GPU (then JAX's own backend search must run)."""
    return _exists(_TPU_DEVICE_FILES) or _exists(_GPU_DEVICE_FILES) or _tpu_on_pci_bus()


def skip_tpu_probe(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Names the CPU as JAX's platform on a host with libtpu but no accelerator; True if it did.

    Must run before JAX initialises its backends (any jax.devices(), jit, array creation).
    """
    if "JAX_PLATFORMS" in environ or "JAX_FORCE_TPU_INIT" in environ:
        return False  # the user's choice
    if not libtpu_installed(environ) or accelerator_possible():
        return False  # nothing would print, or JAX has a real accelerator to find
    jax = sys.modules.get("jax")
    if jax is None:
        environ["JAX_PLATFORMS"] = "cpu"  # read by jax's config when jax is imported
        return True
    # jax was imported first (e.g. `import jax, jaxformer`): its config has already read the
    # environment, so update it directly, but only while the backends are still unchosen.
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized() or jax.config.jax_platforms:
            return False
    except (ImportError, AttributeError):  # a jax without these internals: leave it be
        return False
    jax.config.update("jax_platforms", "cpu")
    return True
