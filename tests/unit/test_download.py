"""resumable_download over a MemoryStore behind a FaultyStore: checkpoint, plans, stop, verify."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ossfs_resume import cli
from ossfs_resume import download as dl
from ossfs_resume.checksum import crc64
from ossfs_resume.download import (
    Checkpoint,
    ObjectIdentity,
    PartRecord,
    load_checkpoint,
    resumable_download,
)
from ossfs_resume.errors import (
    CheckpointError,
    ChecksumError,
    NotFoundError,
    PreconditionFailedError,
    StoreUnavailableError,
    UsageError,
)
from ossfs_resume.objectstore import Call, FaultyStore, MemoryStore

KIB = 1024
MIB = 1024 * KIB
PART = 100 * KIB  # the smallest part size allowed


KEY = "dir/obj.bin"
Store = FaultyStore[MemoryStore]


def make_store(data: bytes, *, etag: str | None = None, crc: bool | int = False) -> Store:
    """The object in a MemoryStore, behind a FaultyStore to fail, corrupt or change it mid-run.

    crc=False: no CRC-64 header (as S3), True: the right one, an int: that value.
    """
    memory = MemoryStore("bkt", endpoint="http://fake.invalid")
    memory.put(KEY, data, etag=etag, crc64=crc)
    return FaultyStore(memory)


def fetched(store: Store) -> int:
    """Bytes asked for by GETs."""
    return sum(end - start + 1 for start, end in store.ranges())


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "out" / "file.bin"


@pytest.fixture(autouse=True)
def _out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out").mkdir()
    # The command copies parts from the default part cache when there is one: none here.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def cp_of(target: Path) -> Path:
    return Path(str(target) + ".dcp")


def tmp_of(target: Path) -> Path:
    """The download's own temp file (a unique name beside the target), or a path that
    does not exist when there is none."""
    found = sorted(target.parent.glob(f".{target.name}.ossfs-resume-*.tmp"))
    assert len(found) <= 1, found
    return found[0] if found else target.parent / f".{target.name}.ossfs-resume-none.tmp"


def interrupt_after(parts: int) -> Callable[[int, int], None]:
    """A progress callback that acts like Ctrl-C once `parts` parts are done.

    With num_threads=1 at most two parts finish between two calls, so the
    callback always sees a value between `parts` parts and the end.
    """

    def progress(consumed: int, total: int) -> None:
        if consumed >= parts * PART and consumed < total:
            raise KeyboardInterrupt

    return progress


def interrupted_run(
    client: Store, target: Path, *, after: int, threads: int = 1, **kwargs: Any
) -> None:
    """A download of `client`'s object stopped by Ctrl-C once `after` parts are done."""
    with pytest.raises(KeyboardInterrupt):
        resumable_download(
            client,
            KEY,
            target,
            part_size=PART,
            num_threads=threads,
            progress_callback=interrupt_after(after),
            **kwargs,
        )


# --------------------------------------------------------------------------- checkpoint


def sample_checkpoint() -> Checkpoint:
    ident = ObjectIdentity("s3+http://h:1", "bkt", "k", 3 * PART + 5, "etag1", 1.7e9 + 0.25)
    cp = Checkpoint(ident, "/abs/file", PART)
    cp.parts[0] = PartRecord(PART, 0x0123456789ABCDEF)
    cp.parts[3] = PartRecord(5, 7)
    return cp


def test_checkpoint_round_trip_and_atomic_save(tmp_path: Path):
    cp = sample_checkpoint()
    path = str(tmp_path / "x.dcp")
    cp.save(path)
    assert not os.path.exists(path + ".tmp")
    loaded = load_checkpoint(path)
    assert loaded == cp
    assert loaded.done_bytes() == PART + 5
    assert loaded.recorded_end() == 3 * PART + 5
    data = json.loads(Path(path).read_text())
    assert data["parts"][0] == [0, "0123456789abcdef", PART]
    assert data["checksum"].startswith("sha256:")
    assert load_checkpoint(str(tmp_path / "absent.dcp")) is None


def _flip_crc_digit(text: str) -> str:
    data = json.loads(text)
    crc = data["parts"][0][1]
    data["parts"][0][1] = ("1" if crc[0] != "1" else "2") + crc[1:]
    return json.dumps(data)


def _edit_length(text: str) -> str:
    data = json.loads(text)
    data["parts"][1][2] -= 1
    return json.dumps(data)


def _add_part(text: str) -> str:
    data = json.loads(text)
    data["parts"].append([1, "0000000000000001", PART])
    return json.dumps(data)


def _drop_checksum(text: str) -> str:
    data = json.loads(text)
    del data["checksum"]
    return json.dumps(data)


@pytest.mark.parametrize(
    "tamper",
    [
        _flip_crc_digit,
        _edit_length,
        _add_part,
        _drop_checksum,
        lambda t: t.replace('"etag1"', '"etag2"'),
        lambda t: t[: len(t) // 2],
        lambda t: "",
        lambda t: "[1, 2]",
        lambda t: t.replace('"version":2', '"version":1'),
    ],
    ids=[
        "crc",
        "length",
        "extra-part",
        "no-checksum",
        "etag",
        "truncated",
        "empty",
        "not-object",
        "version",
    ],
)
def test_checkpoint_detects_tampering(tmp_path: Path, tamper):
    path = tmp_path / "x.dcp"
    sample_checkpoint().save(str(path))
    path.write_text(tamper(path.read_text()))
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))


@pytest.mark.parametrize(
    "parts",
    [
        [[4, "0000000000000000", 5]],  # beyond the last part
        [[3, "0000000000000000", 6]],  # wrong length for the last part
        [[0, "0000000000000000", PART], [0, "0000000000000000", PART]],  # twice
        [[0, "XYZ", PART]],  # not a CRC
        [[True, "0000000000000000", PART]],  # bool is not a number here
    ],
)
def test_checkpoint_with_valid_checksum_but_impossible_parts_is_rejected(tmp_path: Path, parts):
    """A checkpoint from a buggy writer: the checksum matches, the content cannot be right."""
    body = sample_checkpoint().body()
    body["parts"] = parts
    raw = dl._canonical({**body, "checksum": dl._digest(body)})
    with pytest.raises(CheckpointError):
        Checkpoint.from_json(raw)


# --------------------------------------------------------------------------- planning


def test_small_object_takes_one_get(target: Path):
    data = payload(PART - 1)
    client = make_store(data)
    meta = resumable_download(client, KEY, target, part_size=PART, num_threads=4)
    assert meta.size == len(data)
    assert client.ranges() == [(0, len(data) - 1)]
    assert target.read_bytes() == data
    assert not cp_of(target).exists() and not tmp_of(target).exists()


def test_parts_are_aligned_parallel_and_progress_is_monotonic(target: Path):
    data = payload(10 * PART + 123)
    client = make_store(data, crc=True)
    seen: list[tuple[int, int]] = []
    resumable_download(
        client,
        KEY,
        target,
        part_size=PART,
        num_threads=4,
        progress_callback=lambda c, t: seen.append((c, t)),
    )
    assert sorted(client.ranges()) == [
        (n * PART, min((n + 1) * PART, len(data)) - 1) for n in range(11)
    ]
    assert target.read_bytes() == data
    consumed = [c for c, _ in seen]
    assert consumed == sorted(consumed)
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
    assert {t for _, t in seen} == {len(data)}
    assert fetched(client) == len(data)


def test_zero_byte_object(target: Path):
    client = make_store(b"", crc=True)
    seen: list[tuple[int, int]] = []
    resumable_download(client, KEY, target, progress_callback=lambda *a: seen.append(a))
    assert target.read_bytes() == b""
    assert client.ranges() == []
    assert seen[-1] == (0, 0)
    assert not cp_of(target).exists() and not tmp_of(target).exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"part_size": 100 * KIB - 1},
        {"part_size": "6G"},
        {"part_size": "lots"},
        {"num_threads": 0},
        {"num_threads": -3},
        {"num_threads": True},
    ],
)
def test_bad_arguments_fail_before_any_request(target: Path, kwargs):
    client = make_store(b"x" * 10)
    with pytest.raises(UsageError):
        resumable_download(client, KEY, target, **kwargs)
    assert client.calls == []


def test_bad_paths_fail_before_any_request(tmp_path: Path, target: Path):
    client = make_store(b"x" * 10)
    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    cases = [
        ({"filename": tmp_path / "nodir" / "f"}, "does not exist"),
        ({"filename": tmp_path}, "is a directory"),
        ({"checkpoint_file": tmp_path / "nodir" / "c.dcp"}, "does not exist"),
        ({"checkpoint_file": afile / "c.dcp"}, "not a directory"),
        ({"checkpoint_file": Path("/proc/c.dcp")}, "not writable"),
        ({"checkpoint_file": target}, "would overwrite"),
    ]
    for kwargs, needle in cases:
        kwargs.setdefault("filename", target)
        with pytest.raises(UsageError, match=needle):
            resumable_download(client, KEY, **kwargs)
    assert client.count("head") == 0


def test_missing_key(target: Path):
    client = make_store(b"abc")
    with pytest.raises(NotFoundError):
        resumable_download(client, "nope", target)
    assert not target.exists() and not tmp_of(target).exists()


# --------------------------------------------------------------------------- stop and resume


def test_interrupt_keeps_finished_parts_and_resume_uses_recorded_part_size(target: Path):
    data = payload(12 * PART + 7)
    client = make_store(data)
    interrupted_run(client, target, after=3, threads=2)
    assert not target.exists()
    cp = load_checkpoint(str(cp_of(target)))
    assert cp is not None and cp.part_size == PART
    assert 3 <= len(cp.parts) < 13
    on_disk = tmp_of(target).read_bytes()
    for n, rec in cp.parts.items():
        assert on_disk[n * PART : n * PART + rec.length] == data[n * PART : n * PART + rec.length]
        assert crc64(data[n * PART : n * PART + rec.length]) == rec.crc

    client.calls.clear()
    seen: list[tuple[int, int]] = []
    resumable_download(
        client,
        KEY,
        target,
        part_size=4 * PART,  # ignored: the checkpoint's part size wins
        num_threads=3,
        progress_callback=lambda *a: seen.append(a),
    )
    assert target.read_bytes() == data
    assert all(s % PART == 0 and (e + 1) % PART in (0, 7) for s, e in client.ranges())
    assert {s // PART for s, _ in client.ranges()} == set(range(13)) - set(cp.parts)
    assert fetched(client) == len(data) - cp.done_bytes()
    assert seen[0] == (cp.done_bytes(), len(data))
    assert not cp_of(target).exists() and not tmp_of(target).exists()


def test_resume_refetches_a_recorded_part_modified_on_disk(target: Path, caplog):
    data = payload(8 * PART)
    client = make_store(data)
    interrupted_run(client, target, after=3)
    cp = load_checkpoint(str(cp_of(target)))
    victim = min(cp.parts)
    with open(tmp_of(target), "r+b") as f:
        f.seek(victim * PART + 10)
        f.write(b"\x00garbage\x00")
    client.calls.clear()
    with caplog.at_level(logging.WARNING, logger="ossfs_resume.download"):
        resumable_download(client, KEY, target, part_size=PART)
    assert target.read_bytes() == data
    refetched = {s // PART for s, _ in client.ranges()}
    assert refetched == (set(range(8)) - set(cp.parts)) | {victim}
    assert any("no longer match" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["crc", "json", "truncated"])
def test_damaged_checkpoint_means_full_restart_and_one_warning(target: Path, caplog, damage):
    data = payload(6 * PART + 1)
    client = make_store(data)
    interrupted_run(client, target, after=2)
    path = cp_of(target)
    temp = tmp_of(target)
    assert temp.exists()
    if damage == "crc":
        path.write_text(_flip_crc_digit(path.read_text()))
    elif damage == "json":
        path.write_text(path.read_text().replace(f'"part_size":{PART}', '"part_size":204800'))
    else:
        path.write_text(path.read_text()[:-40])
    client.calls.clear()
    with caplog.at_level(logging.INFO, logger="ossfs_resume"):
        resumable_download(client, KEY, target, part_size=PART)
    assert target.read_bytes() == data
    assert fetched(client) == len(data)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "damaged" in warnings[0].getMessage()
    assert not temp.exists()  # its temp file (ours, named in it) went with it


@pytest.mark.parametrize(
    "content",
    [b"my notes, not a checkpoint\n", b'{"notes": ["a", "b"]}', os.urandom(64), b""],
    ids=["text", "json", "binary", "empty"],
)
def test_a_file_that_is_not_a_checkpoint_is_refused_and_left_untouched(
    tmp_path: Path, target: Path, content: bytes
):
    client = make_store(payload(3 * PART))
    notes = tmp_path / "notes.json"
    notes.write_bytes(content)
    with pytest.raises(UsageError, match="not an ossfs-resume download checkpoint"):
        resumable_download(client, KEY, target, part_size=PART, checkpoint_file=notes)
    assert notes.read_bytes() == content
    assert client.ranges() == []
    assert not target.exists() and not tmp_of(target).exists()


def test_an_existing_temp_like_file_of_the_user_is_never_touched(target: Path):
    data = payload(3 * PART)
    client = make_store(data)
    theirs = Path(str(target) + ".tmp")
    theirs.write_bytes(b"the user's own file")
    target.write_bytes(b"the old target")
    resumable_download(client, KEY, target, part_size=PART)
    assert target.read_bytes() == data
    assert theirs.read_bytes() == b"the user's own file"


def test_a_checkpoint_naming_a_temp_file_that_is_not_ours_is_damaged(target: Path, tmp_path):
    data = payload(3 * PART)
    client = make_store(data)
    interrupted_run(client, target, after=1)
    path = cp_of(target)
    body = json.loads(path.read_text())
    body.pop("checksum")
    precious = tmp_path / "out" / "precious.txt"
    precious.write_text("keep me")
    body["temp"] = str(precious)
    path.write_bytes(dl._canonical({**body, "checksum": dl._digest(body)}))
    resumable_download(client, KEY, target, part_size=PART)
    assert target.read_bytes() == data
    assert precious.read_text() == "keep me"


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_short_or_missing_temp_file_means_full_restart(target: Path, how):
    data = payload(6 * PART + 1)
    client = make_store(data)
    interrupted_run(client, target, after=2)
    cp = load_checkpoint(str(cp_of(target)))
    if how == "truncated":
        os.truncate(tmp_of(target), cp.recorded_end() - 1)
    else:
        tmp_of(target).unlink()
    client.calls.clear()
    resumable_download(client, KEY, target, part_size=PART)
    assert target.read_bytes() == data
    assert fetched(client) == len(data)


def test_changed_object_between_runs_starts_over(target: Path):
    old, new = payload(6 * PART, 1), payload(6 * PART, 2)
    client = make_store(old)
    interrupted_run(client, target, after=2)
    client.inner.put(KEY, new, crc64=False)
    client.calls.clear()
    resumable_download(client, KEY, target, part_size=PART)
    assert target.read_bytes() == new
    assert fetched(client) == len(new)


def test_worker_error_stops_scheduling_and_keeps_finished_parts(target: Path):
    data = payload(40 * PART)
    client = make_store(data)
    client.fail(
        "get_range",
        StoreUnavailableError("GET: 503 SlowDown after 4 attempts"),
        when=lambda call: call.start == 5 * PART,
    )
    with pytest.raises(StoreUnavailableError):
        resumable_download(client, KEY, target, part_size=PART, num_threads=2)
    assert (5 * PART, 6 * PART - 1) in client.ranges()
    requested = {s // PART for s, _ in client.ranges()}
    assert len(requested) < 20, "kept scheduling parts after a failure"
    cp = load_checkpoint(str(cp_of(target)))
    assert 5 not in cp.parts
    assert set(cp.parts) <= requested
    on_disk = tmp_of(target).read_bytes()
    for n in cp.parts:
        assert on_disk[n * PART : (n + 1) * PART] == data[n * PART : (n + 1) * PART]
    assert not target.exists()


def test_object_changed_mid_run_leaves_target_alone_and_discards_parts(target: Path):
    old, new = payload(8 * PART, 1), payload(8 * PART, 2)
    target.write_bytes(b"previous contents")
    client = make_store(old)

    def change(call: Call) -> None:
        client.inner.put(KEY, new, crc64=False)

    client.before("get_range", change, when=lambda call: call.start == 2 * PART)
    with pytest.raises(PreconditionFailedError, match="changed during the download"):
        resumable_download(client, KEY, target, part_size=PART, num_threads=1)
    assert target.read_bytes() == b"previous contents"
    assert not cp_of(target).exists() and not tmp_of(target).exists()
    client.clear()
    resumable_download(client, KEY, target, part_size=PART, num_threads=1)
    assert target.read_bytes() == new


# --------------------------------------------------------------------------- verification


def test_crc_mismatch_removes_checkpoint_and_temp(target: Path):
    data = payload(5 * PART + 9)
    client = make_store(data, crc=crc64(data))
    client.corrupt(3 * PART + 17)
    target.write_bytes(b"keep me")
    with pytest.raises(ChecksumError, match="CRC-64"):
        resumable_download(client, KEY, target, part_size=PART, num_threads=3)
    assert target.read_bytes() == b"keep me"
    assert not cp_of(target).exists() and not tmp_of(target).exists()
    # The retry starts from nothing, so a transient corruption does not stick.
    client.clear()
    client.calls.clear()
    resumable_download(client, KEY, target, part_size=PART)
    assert target.read_bytes() == data
    assert fetched(client) == len(data)


def test_md5_mismatch_removes_checkpoint_and_temp(target: Path):
    data = payload(3 * PART)
    client = make_store(data)
    client.corrupt(5)
    with pytest.raises(ChecksumError, match="MD5"):
        resumable_download(client, KEY, target, part_size=PART)
    assert not target.exists()
    assert not cp_of(target).exists() and not tmp_of(target).exists()


def test_multipart_etag_falls_back_to_rereading_parts(target: Path, monkeypatch):
    data = payload(4 * PART)
    client = make_store(data, etag="0123456789abcdef0123456789abcdef-4")
    real_verify = dl._Download._verify

    def corrupt_temp_then_verify(job: Any, cp: Any) -> None:
        with open(tmp_of(target), "r+b") as f:  # the disk changed it after it was written
            f.seek(PART + 3)
            f.write(b"\xff\xfe")
        real_verify(job, cp)

    monkeypatch.setattr(dl._Download, "_verify", corrupt_temp_then_verify)
    with pytest.raises(ChecksumError, match=r"parts 1 differ"):
        resumable_download(client, KEY, target, part_size=PART)
    monkeypatch.undo()
    assert not cp_of(target).exists() and not tmp_of(target).exists()
    resumable_download(client, KEY, target, part_size=PART)
    assert target.read_bytes() == data


def test_checkpoint_disabled_writes_none(target: Path):
    data = payload(5 * PART)
    client = make_store(data)
    seen_cp: list[bool] = []
    resumable_download(
        client,
        KEY,
        target,
        part_size=PART,
        num_threads=3,
        enable_checkpoint=False,
        progress_callback=lambda c, t: seen_cp.append(cp_of(target).exists()),
    )
    assert target.read_bytes() == data
    assert seen_cp and not any(seen_cp)
    assert len(client.ranges()) == 5
    assert not cp_of(target).exists() and not tmp_of(target).exists()


def test_explicit_checkpoint_path(tmp_path: Path, target: Path):
    data = payload(4 * PART)
    client = make_store(data)
    cp_path = tmp_path / "elsewhere.json"
    interrupted_run(client, target, after=1, checkpoint_file=cp_path)
    assert cp_path.exists() and not cp_of(target).exists()
    resumable_download(client, KEY, target, checkpoint_file=cp_path)
    assert target.read_bytes() == data
    assert not cp_path.exists()


# --------------------------------------------------------------------------- CLI pieces


def cli_args(target: Path, **over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_download_parser(parser.add_subparsers(dest="command"))
    argv = ["download", "s3://bkt/dir/obj.bin", str(target), "--endpoint", "http://x.invalid"]
    args = parser.parse_args(argv + over.pop("extra", []))
    return args


def test_parser_defaults(target: Path):
    args = cli_args(target)
    assert args.part_size == str(dl.DEFAULT_PART_SIZE)
    assert args.threads == dl.DEFAULT_THREADS == 8
    assert args.checkpoint is None and args.no_checkpoint is False
    assert cli.resume_command(args) == (
        f"ossfs-resume download s3://bkt/dir/obj.bin {target} --endpoint http://x.invalid"
    )
    args = cli_args(target, extra=["--threads", "4", "--part-size", "1M", "--anonymous", "-v"])
    assert cli.resume_command(args).endswith("--anonymous --part-size 1M --threads 4 -v")


def test_cmd_download_ctrl_c_prints_one_line_and_returns_130(target: Path, monkeypatch, capsys):
    data = payload(6 * PART)

    fake = make_store(data)
    fake.fail("get_range", KeyboardInterrupt(), when=lambda call: (call.start or 0) >= 3 * PART)
    monkeypatch.setattr("ossfs_resume.cli.make_client", lambda url, args, **kw: fake)
    args = cli_args(target, extra=["--threads", "1", "--part-size", "100K"])
    assert cli.cmd_download(args) == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert "run the same command to resume: ossfs-resume download s3://bkt/dir/obj.bin" in err[0]
    assert len(load_checkpoint(str(cp_of(target))).parts) == 3
    fake.clear()
    assert cli.cmd_download(args) == 0
    assert target.read_bytes() == data


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--part-size", "99K"], "bad part size"),
        (["--threads", "0"], r"bad --threads 0: must be 1\.\.256"),
        (["--threads", "257"], r"bad --threads 257: must be 1\.\.256"),
        (["--checkpoint", "c", "--no-checkpoint"], "cannot be used together"),
    ],
)
def test_cmd_download_usage_errors(target: Path, monkeypatch, extra, needle):
    monkeypatch.setattr("ossfs_resume.cli.make_client", pytest.fail)
    with pytest.raises(UsageError, match=needle):
        cli.cmd_download(cli_args(target, extra=extra))


def test_cmd_download_needs_a_key(target: Path, monkeypatch):
    monkeypatch.setattr("ossfs_resume.cli.make_client", pytest.fail)
    args = cli_args(target)
    args.url = "s3://bkt/dir/"
    with pytest.raises(UsageError, match="names no object"):
        cli.cmd_download(args)


# --------------------------------------------------------------------------- progress display


def test_progress_reporter_bar_and_log_lines(caplog):
    import io

    from ossfs_resume.progress import ProgressReporter

    stream = io.StringIO()
    with ProgressReporter("obj", mode="always", stream=stream) as bar:
        bar(0, 3 * MIB)
        bar(2 * MIB, 3 * MIB)
        bar(MIB, 3 * MIB)  # ignored: never backwards
        assert bar.consumed == 2 * MIB
        bar(3 * MIB, 3 * MIB)
    assert "3.00M/3.00M" in stream.getvalue()

    quiet = io.StringIO()
    with caplog.at_level(logging.INFO, logger="ossfs_resume.progress"):
        with ProgressReporter("obj", stream=quiet) as rep:  # a StringIO is not a TTY
            rep(MIB, 4 * MIB)
            rep(4 * MIB, 4 * MIB)
        with ProgressReporter("empty", mode="never") as rep:
            rep(0, 0)
            rep(0, 0)
    assert quiet.getvalue() == ""
    text = caplog.text
    assert "obj: starting, 4.0 MiB, resuming at 1.0 MiB" in text
    assert "obj: finished at 4.0 MiB of 4.0 MiB; 3.0 MiB in" in text
    assert "empty: finished at 0 B of 0 B" in text
