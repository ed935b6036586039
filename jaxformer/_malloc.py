"""Huge pages for XLA's CPU buffers: the entry points ask glibc's malloc to use them.

XLA on the CPU allocates a step's temporaries (hundreds of MiB at the default run's shape) with
malloc, which serves blocks that large straight from mmap and unmaps them on free. So every step
faults in fresh, zeroed 4 KiB pages: 3.8 million minor page faults in a 30-step
`python -m jaxformer.bench train`, about a third of the step's time. With the tunable
`glibc.malloc.hugetlb=1` (glibc 2.35 and later) malloc marks those mappings MADV_HUGEPAGE, and
where transparent huge pages are in `madvise` or `always` mode the kernel backs them with 2 MiB
pages: 28x fewer faults, and the default run's step took 268 instead of 369 ms (measured on the
2-core development machine; benchmarks/RESULTS.md).

glibc reads its tunables once, when the process starts, so `train.py`, `finetune.py`, `eval.py`
and `python -m jaxformer.{bench,convert}` re-execute themselves with GLIBC_TUNABLES extended
before doing anything else (same process id, same arguments). Library users set it themselves:
`export GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. `JAXFORMER_HUGEPAGES=0` turns this off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXFORMER_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()
    except (AttributeError, OSError, ValueError):  # not glibc (musl, macOS, Windows)
        return ()


def _huge_pages_possible() -> bool:
    try:
        with open(_THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepage_environment(environ: Mapping[str, str]) -> Optional[dict[str, str]]:
    """`environ` with the huge-page tunable added, or None where it is set, off or would do nothing."""
    if environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:  # set already (by us before the exec, or by the user)
        return None
    if _glibc_version() < (2, 35) or not _huge_pages_possible():
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def reexec_with_hugepages() -> None:
    """Replaces this process by itself with the huge-page tunable set; returns where it can't."""
    env = hugepage_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # run on as we are: slower, not wrong
