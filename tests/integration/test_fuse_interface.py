"""The mount uses mfusepy through its public interface: a plain FUSE, reads via read_buf.

The mount daemon runs under a probe (the real CLI, run by ``runpy``) that counts the
adapter's read callbacks and, when the daemon exits, reports whether anything in the
process subclassed mfusepy.FUSE or changed mfusepy's module, FUSE or Operations.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest
from conftest import Mounter, md5_file
from local_store import BIG_KEY

pytestmark = [pytest.mark.integration, pytest.mark.fuse]

# argv: probe REPORT python -m ossfs_resume.cli ARGS...
PROBE = """
import atexit, json, runpy, sys

from ossfs_resume import fuse_ops

report = sys.argv[1]
argv = sys.argv[sys.argv.index("ossfs_resume.cli") + 1 :]
mfusepy = fuse_ops._load_mfusepy()  # as the mount loads it (libfuse3 preferred)
OBJECTS = {"mfusepy": mfusepy, "FUSE": mfusepy.FUSE, "Operations": mfusepy.Operations}


def snapshot():
    return {f"{n}.{k}": id(v) for n, o in OBJECTS.items() for k, v in vars(o).items()}


before = snapshot()
calls = {"read": 0, "read_buf": 0}


def counting(name):
    real = getattr(fuse_ops.FuseAdapter, name)

    def wrapper(self, *args):
        calls[name] += 1
        return real(self, *args)

    return wrapper


for name in calls:
    setattr(fuse_ops.FuseAdapter, name, counting(name))


@atexit.register
def write_report():  # in the daemon, after the unmount
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    subclasses = [repr(c) for c in mfusepy.FUSE.__subclasses__()]
    with open(report, "w") as f:
        json.dump({"calls": calls, "changed": changed, "subclasses": subclasses}, f)


sys.argv = ["ossfs_resume.cli", *argv]
runpy.run_module("ossfs_resume.cli", run_name="__main__", alter_sys=True)
"""


def test_reads_go_through_read_buf_of_a_plain_fuse(
    mounter: Mounter, sample_tree: dict[str, Path], tmp_path: Path
):
    probe = tmp_path / "ossfs_readbuf_probe.py"  # "ossfs" in argv: conftest finds the daemon
    probe.write_text(PROBE)
    report = tmp_path / "probe.json"
    mount = mounter.mount(
        extra=["--part-size", "1M"], wrapper=[sys.executable, str(probe), str(report)]
    )
    key = "data/2024/02/part-000.bin"
    assert md5_file(mount.path / key) == md5_file(sample_tree[key])
    assert md5_file(mount.path / key) == md5_file(sample_tree[key])  # from the cache
    local = sample_tree[BIG_KEY]
    rng = random.Random(11)
    with open(mount.path / BIG_KEY, "rb") as remote, open(local, "rb") as want:
        for _ in range(50):
            offset = rng.randrange(0, local.stat().st_size)
            remote.seek(offset)
            want.seek(offset)
            assert remote.read(200_000) == want.read(200_000), offset
    mounter.unmount(mount)

    deadline = time.monotonic() + 30
    while not report.exists():
        assert time.monotonic() < deadline, f"no probe report\n{mount.log()}"
        time.sleep(0.1)
    got = json.loads(report.read_text())
    assert got["calls"]["read_buf"] > 0, got
    assert got["calls"]["read"] == 0, got  # libfuse prefers read_buf
    assert got["subclasses"] == []
    assert got["changed"] == []
