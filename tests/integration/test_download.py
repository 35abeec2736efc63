"""Resumable download against the real store: kill -9, Ctrl-C, tampering, versions, oss2.

Bytes fetched are counted on the server side of a NetProxy (the sum of the
Range lengths it relayed), so a download that quietly refetched everything
could not pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLI, REPO, ranged_bytes, run_cli, store_env
from netproxy import NetProxy, ProxyConfig

from ossfs_resume.client import StoreClient, StoreConfig
from ossfs_resume.download import load_checkpoint, resumable_download
from ossfs_resume.errors import NotFoundError, PreconditionFailedError, UsageError
from ossfs_resume.signing import Credentials

pytestmark = [pytest.mark.integration]

MIB = 1 << 20
BIG = 64 * MIB  # the interruption tests' object
MID = 16 * MIB + 12345  # the in-process tests' object: 17 parts of 1 MiB


def download_cli() -> list[str]:
    """The real ``ossfs-resume download`` command."""
    return [*CLI, "download"]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def client_for(store, endpoint: str, protocol: str = "oss") -> StoreClient:
    """oss: anonymous (SeaweedFS grants anonymous read); s3: signed with the store's keys."""
    creds = None
    if protocol == "s3":
        creds = Credentials(store.access_key_id, store.access_key_secret)
    return StoreClient(
        StoreConfig(
            protocol=protocol,  # type: ignore[arg-type]
            endpoint=endpoint,
            bucket=store.bucket,
            credentials=creds,
            pool_size=8,
        )
    )


def unique_key(prefix: str) -> str:
    return f"download/{prefix}-{random.randrange(1 << 40):010x}.bin"


def put_random(store, prefix: str, size: int, seed: int) -> tuple[str, bytes]:
    key = unique_key(prefix)
    data = random.Random(seed).randbytes(size)
    store.put_bytes(key, data)
    return key, data


def cp_of(path: Path) -> Path:
    return Path(f"{path}.dcp")


def tmp_of(path: Path) -> Path:
    """The download's own temp file (a unique name beside the target), or a path that
    does not exist when there is none."""
    found = sorted(path.parent.glob(f".{path.name}.ossfs-resume-*.tmp"))
    assert len(found) <= 1, found
    return found[0] if found else path.parent / f".{path.name}.ossfs-resume-none.tmp"


def interrupt_after(parts: int):
    """A progress callback that acts like Ctrl-C once `parts` 1 MiB parts are done."""

    def progress(consumed: int, total: int) -> None:
        if parts * MIB <= consumed < total:
            raise KeyboardInterrupt

    return progress


@pytest.fixture(scope="module")
def big_object(store) -> tuple[str, bytes]:
    return put_random(store, "big", BIG, seed=64)


@pytest.fixture
def slow_proxy(store) -> Iterator[NetProxy]:
    """4 MiB/s per connection: 64 MiB over 4 connections takes ~4 s, time to interrupt."""
    port = int(store.endpoint.rsplit(":", 1)[1])
    with NetProxy(ProxyConfig(upstream_port=port, rate_bytes_per_s=4 * MIB)) as p:
        yield p


def _recorded(cp_path: Path) -> int:
    """Bytes a checkpoint records as done (0 while it is absent)."""
    try:
        data = json.loads(cp_path.read_bytes())
    except (OSError, ValueError):
        return 0
    return sum(length for _n, _crc, length in data.get("parts", []))


def _start_and_stop_midway(args: list[str], env: dict[str, str], cp_path: Path, size: int, sig):
    """Run the CLI and send `sig` once the checkpoint records about half the object."""
    proc = subprocess.Popen(
        [*download_cli(), *args],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if _recorded(cp_path) >= size // 2:
                proc.send_signal(sig)
                break
            time.sleep(0.02)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_kill9_midway_then_rerun_fetches_only_the_rest(store, slow_proxy, big_object, tmp_path):
    key, data = big_object
    out = tmp_path / "big.bin"
    args = [f"s3://{store.bucket}/{key}", str(out), "--endpoint", slow_proxy.endpoint]
    args += ["--threads", "4", "--part-size", "1M"]
    env = store_env(store)
    code, err = _start_and_stop_midway(args, env, cp_of(out), BIG, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"finished before it could be killed: {err}"
    assert not out.exists()
    cp = load_checkpoint(str(cp_of(out)))  # a kill -9 never leaves a torn checkpoint
    assert cp is not None and cp.part_size == MIB
    done = cp.done_bytes()
    assert BIG // 4 <= done < BIG
    assert tmp_of(out).stat().st_size == BIG

    slow_proxy.reset_counts()
    result = subprocess.run(
        [*download_cli(), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr
    fetched = ranged_bytes(slow_proxy)
    assert BIG - done <= fetched <= (BIG - done) + 4 * MIB, (fetched, done)
    assert md5(out.read_bytes()) == md5(data)
    assert not cp_of(out).exists() and not tmp_of(out).exists()


def test_ctrl_c_prints_one_resume_line_that_works(store, slow_proxy, big_object, tmp_path):
    key, data = big_object
    out = tmp_path / "big.bin"
    args = [f"oss://{store.bucket}/{key}", str(out), "--endpoint", slow_proxy.endpoint]
    args += ["--threads", "4", "--part-size", "2M"]
    env = store_env(store, "oss")
    code, err = _start_and_stop_midway(args, env, cp_of(out), BIG, signal.SIGINT)
    assert code == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = "run the same command to resume: "
    assert prefix in lines[0], lines[0]
    done = load_checkpoint(str(cp_of(out))).done_bytes()
    assert 0 < done < BIG

    command = shlex.split(lines[0].split(prefix, 1)[1])
    assert command[:2] == ["ossfs-resume", "download"]
    slow_proxy.reset_counts()
    result = subprocess.run(
        [*download_cli(), *command[2:]],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert ranged_bytes(slow_proxy) <= (BIG - done) + 4 * 2 * MIB
    assert md5(out.read_bytes()) == md5(data)
    assert not cp_of(out).exists()


@pytest.fixture
def mid_object(store) -> tuple[str, bytes]:
    return put_random(store, "mid", MID, seed=16)


def _interrupted_run(client: StoreClient, key: str, out: Path, parts: int = 4) -> None:
    with pytest.raises(KeyboardInterrupt):
        resumable_download(
            client,
            key,
            out,
            part_size=MIB,
            num_threads=2,
            progress_callback=interrupt_after(parts),
        )
    assert load_checkpoint(str(cp_of(out))).done_bytes() >= parts * MIB


def test_in_process_resume_uses_the_recorded_part_size(store, proxy, mid_object, tmp_path):
    key, data = mid_object
    out = tmp_path / "mid.bin"
    client = client_for(store, proxy.endpoint)
    _interrupted_run(client, key, out)
    done = load_checkpoint(str(cp_of(out))).done_bytes()
    proxy.reset_counts()
    resumable_download(client, key, out, part_size="4M", num_threads=3)
    assert ranged_bytes(proxy) == MID - done
    starts = [int(r.split("=")[1].split("-")[0]) for m, _, r in proxy.requests() if m == "GET"]
    assert starts and all(s % MIB == 0 for s in starts)
    assert md5(out.read_bytes()) == md5(data)


@pytest.mark.parametrize("damage", ["checkpoint-crc", "checkpoint-json", "temp-truncated"])
def test_damage_between_runs_means_a_full_correct_restart(
    store, proxy, mid_object, tmp_path, caplog, damage
):
    key, data = mid_object
    out = tmp_path / "mid.bin"
    client = client_for(store, proxy.endpoint)
    _interrupted_run(client, key, out)
    path = cp_of(out)
    raw = json.loads(path.read_text())
    if damage == "checkpoint-crc":
        crc = raw["parts"][0][1]
        raw["parts"][0][1] = ("0" if crc[0] != "0" else "1") + crc[1:]
        path.write_text(json.dumps(raw))
    elif damage == "checkpoint-json":
        raw["object"]["size"] += 1  # an edit without fixing the checksum
        path.write_text(json.dumps(raw))
    else:
        os.truncate(tmp_of(out), MIB)
    proxy.reset_counts()
    with caplog.at_level(logging.WARNING, logger="ossfs_resume"):
        resumable_download(client, key, out, part_size=MIB, num_threads=4)
    assert ranged_bytes(proxy) == MID, "did not start over"
    assert md5(out.read_bytes()) == md5(data)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert ("damaged" if damage.startswith("checkpoint") else "temp file") in warnings[0]
    assert not cp_of(out).exists() and not tmp_of(out).exists()


def test_object_overwritten_between_runs(store, proxy, tmp_path):
    key, _old = put_random(store, "between", MID, seed=1)
    new = random.Random(2).randbytes(MID)  # same size: only the ETag tells them apart
    out = tmp_path / "obj.bin"
    client = client_for(store, proxy.endpoint, "s3")
    _interrupted_run(client, key, out)
    store.put_bytes(key, new)
    proxy.reset_counts()
    meta = resumable_download(client, key, out, part_size=MIB)
    assert meta.etag == md5(new)
    assert ranged_bytes(proxy) == MID
    assert out.read_bytes() == new


def test_object_overwritten_during_a_run(store, proxy, tmp_path):
    key, _old = put_random(store, "during", 6 * MIB, seed=3)
    new = random.Random(4).randbytes(6 * MIB)
    out = tmp_path / "obj.bin"
    out.write_bytes(b"the previous download")
    client = client_for(store, proxy.endpoint)
    overwritten = []

    def overwrite_after_first_part(consumed: int, total: int) -> None:
        if consumed > 0 and not overwritten:
            store.put_bytes(key, new)
            overwritten.append(consumed)

    with pytest.raises(PreconditionFailedError, match="changed during the download") as info:
        resumable_download(
            client,
            key,
            out,
            part_size=MIB,
            num_threads=1,
            progress_callback=overwrite_after_first_part,
        )
    assert info.value.status == 412
    assert overwritten == [MIB]
    assert out.read_bytes() == b"the previous download"
    assert not cp_of(out).exists() and not tmp_of(out).exists()
    # Every part request was pinned to the version that HEAD returned.
    assert all(r is not None for m, _, r in proxy.requests() if m == "GET")

    resumable_download(client, key, out, part_size=MIB, num_threads=2)
    assert out.read_bytes() == new


def _multipart_object(store, size_parts: list[int], seed: int) -> tuple[str, bytes]:
    """Upload with the multipart API: the ETag is "<hex>-N", not an MD5 of the content."""
    key = unique_key("multipart")
    s3 = store.s3_client()
    rng = random.Random(seed)
    chunks = [rng.randbytes(n) for n in size_parts]
    upload = s3.create_multipart_upload(Bucket=store.bucket, Key=key)
    parts = []
    for i, chunk in enumerate(chunks, 1):
        resp = s3.upload_part(
            Bucket=store.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=i, Body=chunk
        )
        parts.append({"PartNumber": i, "ETag": resp["ETag"]})
    s3.complete_multipart_upload(
        Bucket=store.bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    return key, b"".join(chunks)


def test_same_result_as_oss2_resumable_download(store, mid_object, tmp_path, caplog):
    import oss2

    plain_key, plain = mid_object
    multi_key, multi = _multipart_object(store, [5 * MIB, 5 * MIB, 777_777], seed=5)
    bucket = oss2.Bucket(oss2.AnonymousAuth(), store.endpoint, store.bucket)
    client = client_for(store, store.endpoint, "oss")
    for key, data, method in ((plain_key, plain, "MD5"), (multi_key, multi, "per-part CRC-64")):
        theirs = tmp_path / f"oss2-{method[:3]}.bin"
        ours = tmp_path / f"ours-{method[:3]}.bin"
        oss2.resumable_download(
            bucket,
            key,
            str(theirs),
            multiget_threshold=MIB,
            part_size=MIB,
            num_threads=4,
            store=oss2.ResumableDownloadStore(root=str(tmp_path / "oss2-store")),
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ossfs_resume.download"):
            meta = resumable_download(client, key, ours, part_size=MIB, num_threads=4)
        assert ours.read_bytes() == theirs.read_bytes() == data
        assert meta.etag == bucket.head_object(key).etag.lower().strip('"')
        assert f"verified ({method})" in caplog.text


def test_connection_resets_resume_inside_the_part(store, proxy, mid_object, tmp_path):
    key, data = mid_object
    out = tmp_path / "mid.bin"
    client = client_for(store, proxy.endpoint)
    proxy.set_faults(reset_every=4)
    resumable_download(client, key, out, part_size="4M", num_threads=2)
    counters = client.counters.snapshot()
    assert counters["retries"] >= 1
    # Bytes received before each reset were kept: nothing was fetched twice.
    assert counters["bytes_received"] == MID
    assert md5(out.read_bytes()) == md5(data)


def test_progress_is_monotonic_parallel_and_ends_at_total(store, proxy, mid_object, tmp_path):
    key, data = mid_object
    out = tmp_path / "mid.bin"
    client = client_for(store, proxy.endpoint, "s3")
    seen: list[tuple[int, int]] = []
    resumable_download(
        client, key, out, part_size=MIB, num_threads=8, progress_callback=lambda *a: seen.append(a)
    )
    consumed = [c for c, _ in seen]
    assert consumed == sorted(consumed)
    assert seen[0] == (0, MID) and seen[-1] == (MID, MID)
    assert proxy.counts()["GET"] == 17
    assert client.counters.snapshot()["bytes_received"] == MID == ranged_bytes(proxy)
    assert md5(out.read_bytes()) == md5(data)


def test_zero_byte_object(store, proxy, sample_tree, tmp_path):
    assert sample_tree["docs/empty.txt"].stat().st_size == 0
    out = tmp_path / "empty.txt"
    seen: list[tuple[int, int]] = []
    client = client_for(store, proxy.endpoint)
    meta = resumable_download(
        client, "docs/empty.txt", out, progress_callback=lambda *a: seen.append(a)
    )
    assert meta.size == 0
    assert out.read_bytes() == b""
    assert seen[-1] == (0, 0)
    assert proxy.counts()["GET"] == 0
    assert not cp_of(out).exists() and not tmp_of(out).exists()


def test_without_checkpoint(store, proxy, mid_object, tmp_path):
    key, data = mid_object
    out = tmp_path / "mid.bin"
    client = client_for(store, proxy.endpoint)
    cp_seen = []
    resumable_download(
        client,
        key,
        out,
        part_size=MIB,
        num_threads=4,
        enable_checkpoint=False,
        progress_callback=lambda c, t: cp_seen.append(cp_of(out).exists()),
    )
    assert cp_seen and not any(cp_seen)
    assert proxy.counts()["GET"] == 17
    assert md5(out.read_bytes()) == md5(data)
    assert not tmp_of(out).exists()


def test_cli_download_of_a_sample_file(store, sample_tree, tmp_path):
    key = "docs/résumé with spaces ✓.txt"
    out = tmp_path / "résumé.txt"
    result = subprocess.run(
        [*download_cli(), f"s3://{store.bucket}/{key}", str(out), "--endpoint", store.endpoint],
        env=store_env(store),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert out.read_bytes() == sample_tree[key].read_bytes()


# --------------------------------------------------------------------------- bad input


def run_download(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if download_cli()[: len(CLI)] == CLI:
        return run_cli(["download", *args], env=env)
    return subprocess.run(
        [*download_cli(), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ossfs-resume: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _not_writable_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/proc")  # root writes anywhere a mode allows; procfs refuses new files
    path = tmp_path / "readonly"
    path.mkdir()
    path.chmod(0o500)
    return path


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--part-size", "99K"], ["bad part size", "100K"]),
        (["--part-size", "6G"], ["bad part size", "5G"]),
        (["--threads", "0"], ["bad --threads 0", "1..256"]),
        (["--threads", "20000000"], ["bad --threads 20000000", "1..256"]),
        (["--checkpoint", "{tmp}/nodir/x.dcp"], ["checkpoint", "does not exist"]),
        (["--checkpoint", "{ro}/x.dcp"], ["checkpoint", "not writable"]),
    ],
    ids=[
        "part-too-small",
        "part-too-big",
        "threads-0",
        "threads-huge",
        "checkpoint-nodir",
        "checkpoint-ro",
    ],
)
def test_bad_input_is_one_line_before_any_request(
    store, proxy, mid_object, tmp_path, extra, needles
):
    key, _ = mid_object
    out = tmp_path / "out.bin"
    extra = [a.format(tmp=tmp_path, ro=_not_writable_dir(tmp_path)) for a in extra]
    args = [f"s3://{store.bucket}/{key}", str(out), "--endpoint", proxy.endpoint, *extra]
    one_line_error(run_download(args, store_env(store)), 2, *needles)
    assert sum(proxy.counts().values()) == 0, proxy.requests()
    assert not out.exists() and not tmp_of(out).exists()


def test_library_bad_input_before_any_request(store, proxy, mid_object, tmp_path):
    key, _ = mid_object
    client = client_for(store, proxy.endpoint)
    out = tmp_path / "out.bin"
    for kwargs in (
        {"part_size": 100 * 1024 - 1},
        {"part_size": 5 * 1024**3 + 1},
        {"num_threads": 0},
        {"checkpoint_file": tmp_path / "nodir" / "x.dcp"},
        {"checkpoint_file": _not_writable_dir(tmp_path) / "x.dcp"},
    ):
        with pytest.raises(UsageError):
            resumable_download(client, key, out, **kwargs)
    assert sum(proxy.counts().values()) == 0


def test_missing_key(store, proxy, tmp_path):
    out = tmp_path / "out.bin"
    client = client_for(store, proxy.endpoint)
    with pytest.raises(NotFoundError):
        resumable_download(client, "download/no-such-key.bin", out)
    args = [f"s3://{store.bucket}/download/no-such-key.bin", str(out), "--endpoint", store.endpoint]
    one_line_error(run_download(args, store_env(store)), 1, "no such object")
    assert not out.exists() and not tmp_of(out).exists() and not cp_of(out).exists()


# --------------------------------------------------------------------------- one engine


def test_a_download_after_a_prefetch_copies_from_the_cache(store, proxy, tmp_path: Path):
    """prefetch and download run on one engine and one part cache: the download moves
    (almost) nothing over the wire; --no-cache fetches everything again."""
    key, data = put_random(store, "after-prefetch", 24 * MIB + 99, seed=31)
    cache = tmp_path / "cache"
    env = store_env(store)
    url = f"s3://{store.bucket}/{key}"
    common = ["--endpoint", proxy.endpoint, "--progress", "never"]
    done = run_cli(
        ["prefetch", url, "--cache-dir", str(cache), "--part-size", "1M", *common], env=env
    )
    assert done.returncode == 0, done.stderr
    assert ranged_bytes(proxy) == len(data)
    proxy.reset_counts()
    out = tmp_path / "copy.bin"
    got = run_cli(
        ["download", url, str(out), "--cache-dir", str(cache), "--part-size", "1M", *common],
        env=env,
    )
    assert got.returncode == 0, got.stderr
    assert md5(out.read_bytes()) == md5(data)
    assert ranged_bytes(proxy) < len(data) // 100  # < 1% of the object over the wire
    proxy.reset_counts()
    again = tmp_path / "again.bin"
    fetched = run_cli(
        ["download", url, str(again), "--no-cache", "--part-size", "1M", *common], env=env
    )
    assert fetched.returncode == 0, fetched.stderr
    assert again.read_bytes() == data
    assert ranged_bytes(proxy) == len(data)


def test_same_bytes_and_progress_calls_as_oss2(store, tmp_path: Path):
    """Code written for oss2.resumable_download needs only a different first argument."""
    oss2 = pytest.importorskip("oss2")
    key, data = put_random(store, "oss2-compat", 5 * MIB + 4321, seed=32)
    bucket = oss2.Bucket(oss2.AnonymousAuth(), store.endpoint, store.bucket)
    client = client_for(store, store.endpoint, "oss")
    runs = {}
    for name, first in (("oss2", bucket), ("ours", client)):
        target = tmp_path / f"{name}.bin"
        calls: list[tuple[int, int]] = []
        (oss2.resumable_download if name == "oss2" else resumable_download)(
            first,
            key,
            str(target),
            multiget_threshold=1024,
            part_size=1 * MIB,
            progress_callback=lambda c, t, calls=calls: calls.append((c, t)),
            num_threads=1,
            store=oss2.ResumableDownloadStore(root=str(tmp_path / f"{name}-store")),
        )
        runs[name] = (target.read_bytes(), calls)
    client.close()
    assert runs["ours"][0] == runs["oss2"][0] == data
    # One thread: oss2 reports what is done before each part, then (total, total) once.
    assert runs["ours"][1] == runs["oss2"][1]
    assert runs["ours"][1].count((len(data), len(data))) == 1
