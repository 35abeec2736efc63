"""The mount-helper form (``ossfs-resume SOURCE MOUNTPOINT -o OPTS``) and access options."""

from __future__ import annotations

import pytest

from ossfs_resume import cli
from ossfs_resume.errors import UsageError
from ossfs_resume.mountopts import (
    file_and_dir_modes,
    fuse_conf_allows_other,
    helper_to_mount_argv,
    is_helper_form,
    parse_id,
    parse_octal,
)


def test_helper_form_is_a_bucket_url_first() -> None:
    assert is_helper_form(["s3://b/", "/mnt"])
    assert is_helper_form(["oss://b", "/mnt", "-o", "ro"])
    assert is_helper_form(["ossfs-resume#s3://b/", "/mnt"])
    assert not is_helper_form(["mount", "s3://b/", "/mnt"])
    assert not is_helper_form(["--version"])
    assert not is_helper_form([])


def test_what_mount_fuse3_passes_becomes_a_mount_command() -> None:
    # Exactly what mount(8) -T FSTAB -> mount.fuse3 ran in a probe on this machine.
    argv = ["s3://b/", "/mnt/b", "-o", "rw,endpoint=http://127.0.0.1:1,allow_other,dev,suid"]
    assert helper_to_mount_argv(argv) == [
        "mount",
        "s3://b/",
        "/mnt/b",
        "--endpoint=http://127.0.0.1:1",
        "--allow-other",
    ]


def test_every_option_translates() -> None:
    opts = (
        "cache_dir=/c,part_size=8M,list_ttl=never,stat_ttl=5,max_parallel=4,cache_size=1G,"
        "cache_min_free=0,region=r,signature_version=v1,addressing=path,anonymous,"
        "read_ahead_kb=0,log_file=/l,ca_bundle=/ca.pem,uid=1,gid=2,umask=022,file_mode=0444,"
        "dir_mode=0555,allow_root,verbose,endpoint=https://h:1/x=y"
    )
    out = helper_to_mount_argv(["ossfs-resume#oss://b/p", "/m", f"-o{opts}"])
    assert out[:3] == ["mount", "oss://b/p", "/m"]
    assert out[3:] == [
        "--cache-dir=/c",
        "--part-size=8M",
        "--list-ttl=never",
        "--list-ttl=5",
        "--max-parallel=4",
        "--cache-size=1G",
        "--cache-min-free=0",
        "--region=r",
        "--signature-version=v1",
        "--addressing=path",
        "--anonymous",
        "--read-ahead-kb=0",
        "--log-file=/l",
        "--ca-bundle=/ca.pem",
        "--uid=1",
        "--gid=2",
        "--umask=022",
        "--file-mode=0444",
        "--dir-mode=0555",
        "--allow-root",
        "--verbose",
        "--endpoint=https://h:1/x=y",
    ]
    # The translation parses as a mount command.
    args = cli.build_parser().parse_args([*out[:-2], "--endpoint=http://h"])
    assert args.command == "mount" and args.anonymous and args.allow_root


def test_generic_options_are_ignored() -> None:
    generic = (
        "ro,rw,defaults,auto,noauto,user,users,nouser,_netdev,nofail,dev,nodev,suid,nosuid,"
        "exec,noexec,noatime,relatime,sync,async,x-systemd.automount,"
        "x-systemd.requires=network-online.target,comment=x"
    )
    assert helper_to_mount_argv(["s3://b", "/m", "-o", generic, "-n", "-s", "-v"]) == [
        "mount",
        "s3://b",
        "/m",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["s3://b", "/m", "-o", "secret_key=abc123"], "unknown mount option 'secret_key'"),
        (["s3://b", "/m", "-o", "cache_dir"], "cache_dir needs a value"),
        (["s3://b", "/m", "-o", "endpoint="], "endpoint needs a value"),
        (["s3://b", "/m", "-o", "anonymous=1"], "anonymous takes no value"),
        (["s3://b", "/m", "-o", "ro=1"], "ro takes no value"),
        (["s3://b", "/m", "-o"], "-o needs"),
        (["s3://b", "/m", "-x"], "unknown argument '-x'"),
        (["s3://b"], "expected SOURCE and MOUNTPOINT"),
        (["s3://b", "/m", "/n"], "expected SOURCE and MOUNTPOINT"),
    ],
)
def test_bad_helper_input_is_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        helper_to_mount_argv(argv)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert "abc123" not in text  # a value is never echoed: it may be a key


def test_cli_helper_form_errors_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["s3://b/", "/m", "-o", "access_key_id=AKIDSECRET"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "access_key_id" in err and "AKIDSECRET" not in err


def test_octal_and_ids() -> None:
    assert parse_octal("--file-mode", "0444") == 0o444
    assert parse_octal("--file-mode", "644") == 0o644
    assert parse_octal("--umask", "0o027", 0o777) == 0o027
    for bad in ("0999", "rw", "", "10000"):
        with pytest.raises(UsageError, match="--file-mode"):
            parse_octal("--file-mode", bad)
    assert parse_id("--uid", "1234") == 1234
    for bad in ("-1", "alice", "4294967295"):
        with pytest.raises(UsageError, match="--uid"):
            parse_id("--uid", bad)


def test_umask_applies_to_both_modes_unless_given() -> None:
    assert file_and_dir_modes(None, None, None) == (0o444, 0o555)
    assert file_and_dir_modes(None, None, 0o022) == (0o444, 0o555)
    assert file_and_dir_modes(None, None, 0o077) == (0o400, 0o500)
    assert file_and_dir_modes(None, None, 0o007) == (0o440, 0o550)
    assert file_and_dir_modes(None, None, 0o027) == (0o440, 0o550)
    assert file_and_dir_modes(0o400, None, 0o002) == (0o400, 0o555)
    assert file_and_dir_modes(None, 0o700, 0o077) == (0o400, 0o700)


def test_fuse_conf(tmp_path: pytest.TempPathFactory) -> None:
    conf = tmp_path / "fuse.conf"  # type: ignore[operator]
    conf.write_text("# user_allow_other\n#user_allow_other\nmount_max = 10\n")
    assert not fuse_conf_allows_other(str(conf))
    conf.write_text("mount_max = 10\n  user_allow_other  # yes\n")
    assert fuse_conf_allows_other(str(conf))
    assert not fuse_conf_allows_other(str(tmp_path / "missing"))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--allow-other", "--allow-root"], "not allowed with argument"),
        (["--file-mode", "9"], "bad --file-mode"),
        (["--umask", "1777"], "bad --umask"),
        (["--uid", "x"], "bad --uid"),
    ],
)
def test_bad_access_options_are_one_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["mount", "s3://b/", "/nonexistent-mountpoint", "--endpoint", "http://h", *extra]
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse's own mistakes
        status = exc.code  # type: ignore[assignment]
    assert status == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_non_root_allow_other_needs_fuse_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    args = cli.build_parser().parse_args(
        ["mount", "s3://b/", "/m", "--endpoint", "http://h", "--allow-other"]
    )
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(cli, "fuse_conf_allows_other", lambda: False)
    with pytest.raises(UsageError, match=r"user_allow_other' in /etc/fuse\.conf"):
        cli.check_allow_other(args)
    monkeypatch.setattr(cli, "fuse_conf_allows_other", lambda: True)
    cli.check_allow_other(args)
    monkeypatch.setattr(cli, "fuse_conf_allows_other", lambda: False)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    cli.check_allow_other(args)  # root needs no fuse.conf line
