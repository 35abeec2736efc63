"""A mount takes its options from --config FILE, and flags on the command line win."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import Mounter, md5_file

from ossfs_resume.prefetch import SOURCE_XATTR

pytestmark = [pytest.mark.integration, pytest.mark.fuse]


def test_a_mount_reads_its_options_from_a_config_file_and_flags_win(
    mounter: Mounter, tmp_path: Path, sample_tree: dict[str, Path]
) -> None:
    config = tmp_path / "ossfs-resume.toml"
    config.write_text(
        'part_size = "1M"\n'  # top level: every command that has the option
        "\n[mount]\n"
        'list_ttl = "never"\n'
        'cache_size = "2G"\n'
        "max_parallel = 4\n"
    )
    key = "docs/readme.txt"
    mount = mounter.mount(extra=["--config", str(config)])
    source = json.loads(os.getxattr(mount.path / key, SOURCE_XATTR))
    assert source["part_size"] == 1 << 20  # from the file
    assert md5_file(mount.path / key) == md5_file(sample_tree[key])
    mounter.unmount(mount)

    flagged = mounter.mount(extra=["--config", str(config), "--part-size", "2M"])
    source = json.loads(os.getxattr(flagged.path / key, SOURCE_XATTR))
    assert source["part_size"] == 2 << 20  # the flag wins over the file
    assert md5_file(flagged.path / key) == md5_file(sample_tree[key])


def test_an_unknown_key_in_the_config_file_is_one_line_and_mounts_nothing(
    mounter: Mounter, tmp_path: Path
) -> None:
    from conftest import run_cli, store_env

    config = tmp_path / "bad.toml"
    config.write_text('[mount]\ncache_sise = "2G"\n')
    target = tmp_path / "mnt"
    target.mkdir()
    result = run_cli(
        [
            "mount",
            f"s3://{mounter.store.bucket}/",
            str(target),
            "--endpoint",
            mounter.store.endpoint,
            "--config",
            str(config),
        ],
        env=store_env(mounter.store),
    )
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cache_sise" in lines[0] and str(config) in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(target)
