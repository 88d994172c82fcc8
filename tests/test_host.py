"""The host's allocator setting (pipeline/edges/host.py): freed memory stays with
the process instead of going back to the kernel. Each case runs in a fresh
interpreter, since the setting is for a process's life."""

import subprocess
import sys

import pytest

CHECK = """
import sys
from pipeline.edges import host

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "on":
    assert host.keep_freed_memory()
before = resident_mib()
block = bytearray(256 * 2**20)  # zero-filled: every page touched
del block
print(resident_mib() - before)
"""


def kept_mib(setting: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHECK, setting], capture_output=True, text=True, check=True
    )
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_for_reuse_only_with_the_setting():
    # By default a block this large is its own mapping, unmapped when freed.
    assert kept_mib("off") < 16
    assert kept_mib("on") > 240
