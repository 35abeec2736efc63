"""Smoke test of scripts/local_store.py: a real SeaweedFS on 127.0.0.1, small sample data."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from local_store import (  # noqa: E402
    BIG_KEY,
    TAR_KEY,
    LocalStore,
    LocalStoreError,
    find_weed,
    load_odd_keys,
    load_sample_tree,
    make_sample_tree,
)

requests = pytest.importorskip("requests")
pytest.importorskip("boto3")

pytestmark = pytest.mark.integration

BIG_SIZE = 8 << 20
NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    try:
        find_weed()
    except LocalStoreError as e:
        pytest.skip(str(e))
    local = LocalStore(tmp_path / "store")
    try:
        local.start(timeout=30)
        yield local
    finally:
        local.stop(grace=3)
        assert not local.is_running()


def test_sample_tree_is_deterministic_and_offset_dependent(tmp_path: Path) -> None:
    tree = make_sample_tree(tmp_path / "a", big_size=1 << 20)
    assert tree[BIG_KEY].stat().st_size == 1 << 20
    assert tree["docs/empty.txt"].stat().st_size == 0
    assert any(" " in k and not k.isascii() for k in tree)
    big = tree[BIG_KEY].read_bytes()
    blocks = {big[i : i + 4096] for i in range(0, len(big), 4096)}
    assert len(blocks) == len(big) // 4096  # no repeated block
    again = make_sample_tree(tmp_path / "b", big_size=1 << 20)
    assert all(tree[k].read_bytes() == again[k].read_bytes() for k in tree)
    mtimes = {k: p.stat().st_mtime_ns for k, p in tree.items()}
    make_sample_tree(tmp_path / "a", big_size=1 << 20)  # already there: not rewritten
    assert {k: p.stat().st_mtime_ns for k, p in tree.items()} == mtimes
    with tarfile.open(tree[TAR_KEY]) as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member)
            assert f is not None
            assert f.read() == tree[member.name].read_bytes()


def test_store_serves_sample_data(store: LocalStore, tmp_path: Path) -> None:
    t0 = time.monotonic()
    tree = make_sample_tree(tmp_path / "sample", big_size=BIG_SIZE)
    load_sample_tree(store, tree)
    refused = load_odd_keys(store)
    assert "odd/ok.txt" not in refused
    info = store.info
    assert info.endpoint.startswith("http://127.0.0.1:")
    base = f"{info.endpoint}/{info.bucket}"

    # boto3 (signed) read-back.
    key = "data/2024/01/part-001.bin"
    body = store.s3_client().get_object(Bucket=info.bucket, Key=key)["Body"].read()
    assert body == tree[key].read_bytes()

    # Unsigned ranged GET, as the OSS-protocol client reads: 206 + Content-Range.
    big = tree[BIG_KEY].read_bytes()
    start, end = 3_000_001, 3_000_001 + 65_535
    r = requests.get(f"{base}/{BIG_KEY}", headers={"Range": f"bytes={start}-{end}"}, timeout=10)
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes {start}-{end}/{BIG_SIZE}"
    assert r.content == big[start : end + 1]
    etag = r.headers["ETag"]
    assert etag == f'"{hashlib.md5(big).hexdigest()}"'  # single PUT: MD5, lowercase, quoted

    # Unicode key, percent-encoded in the path.
    ukey = next(k for k in tree if not k.isascii())
    r = requests.get(f"{base}/{urllib.parse.quote(ukey)}", timeout=10)
    assert r.status_code == 200
    assert r.content == tree[ukey].read_bytes()

    # Conditional reads.
    r = requests.get(
        f"{base}/{BIG_KEY}", headers={"Range": "bytes=0-9", "If-Match": '"0123abcd"'}, timeout=10
    )
    assert r.status_code == 412
    assert b"PreconditionFailed" in r.content
    headers = {"Range": "bytes=0-9", "If-Match": etag}
    r = requests.get(f"{base}/{BIG_KEY}", headers=headers, timeout=10)
    assert r.status_code == 206
    assert r.content == big[:10]

    # Anonymous ListObjectsV2 with a delimiter and URL-encoded keys.
    r = requests.get(
        f"{base}/",
        params={"list-type": "2", "prefix": "docs/", "delimiter": "/", "encoding-type": "url"},
        timeout=10,
    )
    assert r.status_code == 200
    root = ET.fromstring(r.content)
    keys = {urllib.parse.unquote_plus(e.text or "") for e in root.iter(f"{NS}Key")}
    assert keys == {k for k in tree if k.startswith("docs/")}

    # The tar archive as stored is a valid archive of the same bytes.
    r = requests.get(f"{base}/{TAR_KEY}", timeout=10)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        member = tar.getmember("deep/a/b/c/leaf.txt")
        f = tar.extractfile(member)
        assert f is not None
        assert f.read() == tree["deep/a/b/c/leaf.txt"].read_bytes()

    # Restart on the same ports and data dir; data survives.
    endpoint = info.endpoint
    assert store.restart(grace=0).endpoint == endpoint
    r = requests.get(f"{base}/{BIG_KEY}", headers={"Range": "bytes=-100"}, timeout=10)
    assert r.status_code == 206
    assert r.content == big[-100:]

    # Overwrite: the old ETag no longer matches.
    store.put_bytes(BIG_KEY, b"new content")
    r = requests.get(f"{base}/{BIG_KEY}", headers={"If-Match": etag}, timeout=10)
    assert r.status_code == 412
    store.delete(BIG_KEY)
    assert requests.head(f"{base}/{BIG_KEY}", timeout=10).status_code == 404
    assert time.monotonic() - t0 < 60
