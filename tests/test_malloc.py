"""The entry points re-execute themselves with glibc's huge-page tunable (jaxformer/_malloc.py)."""

import os
import subprocess
import sys

import pytest

from jaxformer import _malloc

CLEAN = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", _malloc.OPT_OUT)}
SUPPORTED = _malloc.hugepage_environment(CLEAN) is not None


@pytest.mark.skipif(not SUPPORTED, reason="not glibc >= 2.35 on Linux with transparent huge pages")
def test_tunable_added_to_what_the_user_set():
    assert _malloc.hugepage_environment(CLEAN)["GLIBC_TUNABLES"] == _malloc.TUNABLE
    env = _malloc.hugepage_environment({**CLEAN, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + _malloc.TUNABLE


def test_left_alone_when_set_or_turned_off():
    assert (
        _malloc.hugepage_environment({**CLEAN, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    )
    assert _malloc.hugepage_environment({**CLEAN, _malloc.OPT_OUT: "0"}) is None


@pytest.mark.skipif(not SUPPORTED, reason="not glibc >= 2.35 on Linux with transparent huge pages")
@pytest.mark.parametrize("opt_out", [False, True])
def test_process_reexecutes_itself_once(opt_out):
    code = (
        "import os, sys; print('start', flush=True); from jaxformer import _malloc; "
        "_malloc.reexec_with_hugepages(); print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
    )
    env = {**CLEAN, **({_malloc.OPT_OUT: "0"} if opt_out else {})}
    out = subprocess.run(
        [sys.executable, "-c", code, "arg"], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    if opt_out:
        assert out == ["start", "None ['arg']"]
    else:  # ran twice from the top (same arguments), the second time with the tunable
        assert out == ["start", "start", f"{_malloc.TUNABLE} ['arg']"]
