"""The credential chain: each source's format, its order, refresh of temporary keys.

Files live under a temporary HOME; metadata services are a fake on 127.0.0.1; refresh
timing uses an injected clock, so nothing sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from metadata_server import MetadataServer

from ossfs_resume.client import StoreClient, StoreConfig
from ossfs_resume.credentials import (
    EC2_METADATA_ENV,
    ECS_METADATA_ENV,
    AnonymousSource,
    Chain,
    ChainOptions,
    CredentialsError,
    RefreshingSource,
    StaticSource,
    read_passwd_file,
)
from ossfs_resume.errors import AccessDeniedError, StoreError, UsageError
from ossfs_resume.signing import Credentials
from ossfs_resume.transport import Headers

NONE = ChainOptions()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: only HOME, and no real metadata service."""
    env = {
        "HOME": str(home),
        "AWS_EC2_METADATA_DISABLED": "true",
        "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true",
    }
    env.update(extra)
    return env


def resolve(env: dict[str, str], protocol: str, options: ChainOptions = NONE, bucket: str = "bkt"):
    return Chain(env=env).resolve(protocol, bucket, options)


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


# -- passwd file -------------------------------------------------------------------------


def test_passwd_generic_and_bucket_line(tmp_path: Path) -> None:
    f = write(tmp_path / "passwd", "# keys\n\nGEN:gensecret\nbkt:BKT:bktsecret\nother:O:osecret\n")
    assert read_passwd_file(f, "bkt") == Credentials("BKT", "bktsecret")
    assert read_passwd_file(f, "nope") == Credentials("GEN", "gensecret")
    assert read_passwd_file(f, "other") == Credentials("O", "osecret")


def test_passwd_bucket_line_wins_wherever_it_is(tmp_path: Path) -> None:
    f = write(tmp_path / "passwd", "bkt:BKT:b\nGEN:g\n")
    assert read_passwd_file(f, "bkt") == Credentials("BKT", "b")
    f = write(tmp_path / "passwd2", "other:O:o\n")
    assert read_passwd_file(f, "bkt") is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_passwd_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    f = write(tmp_path / "passwd", "AK:SK\n", mode)
    with pytest.raises(UsageError) as info:
        read_passwd_file(f, "bkt")
    assert str(info.value) == (
        f"credentials file {f} is readable by others (mode {mode:04o}): chmod 600 {f}"
    )


def test_passwd_bad_line_names_the_line_not_the_secret(tmp_path: Path) -> None:
    f = write(tmp_path / "passwd", "AK:SK\nTOPSECRETVALUE\n")
    with pytest.raises(UsageError, match="line 2: expected AK:SK or BUCKET:AK:SK") as info:
        read_passwd_file(f, "bkt")
    assert "TOPSECRET" not in str(info.value)


def test_passwd_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        read_passwd_file(tmp_path / "none", "bkt")


# -- OSS files -----------------------------------------------------------------------------


def test_ossutil_config_v1(home: Path) -> None:
    write(
        home / ".ossutilconfig",
        "[Credentials]\nlanguage=EN\nendpoint=oss-cn-hangzhou.aliyuncs.com\n"
        "accessKeyID=UTILAK\naccessKeySecret=utilsk\nstsToken=utiltok\n",
    )
    source = resolve(base_env(home), "oss")
    assert source.name == "~/.ossutilconfig"
    assert source.get() == Credentials("UTILAK", "utilsk", "utiltok")


def test_ossutil_config_v2_default_and_profile(home: Path) -> None:
    write(
        home / ".ossutilconfig",
        "[default]\naccessKeyId = DEFAK\naccessKeySecret = defsk\nregion=cn-hangzhou\n"
        "[dev]\naccessKeyId = DEVAK\naccessKeySecret = devsk\n",
    )
    assert resolve(base_env(home), "oss").get() == Credentials("DEFAK", "defsk")
    source = resolve(base_env(home), "oss", ChainOptions(profile="dev"))
    assert source.name == "~/.ossutilconfig profile dev"
    assert source.get() == Credentials("DEVAK", "devsk")


def aliyun_config(home: Path, current: str = "main", profiles: list[dict] | None = None) -> None:
    profiles = profiles or [
        {"name": "main", "mode": "AK", "access_key_id": "ALIAK", "access_key_secret": "alisk"},
        {
            "name": "sts",
            "mode": "StsToken",
            "access_key_id": "STSAK",
            "access_key_secret": "stssk",
            "sts_token": "ststok",
        },
        {"name": "odd", "mode": "ChainableRamRoleArn"},
    ]
    write(home / ".aliyun" / "config.json", json.dumps({"current": current, "profiles": profiles}))


def test_aliyun_cli_profiles(home: Path) -> None:
    aliyun_config(home)
    source = resolve(base_env(home), "oss")
    assert source.name == "~/.aliyun/config.json profile main"
    assert source.get() == Credentials("ALIAK", "alisk")
    source = resolve(base_env(home), "oss", ChainOptions(profile="sts"))
    assert source.get() == Credentials("STSAK", "stssk", "ststok")


def test_aliyun_unsupported_mode_is_skipped(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    aliyun_config(home, current="odd")
    with caplog.at_level(logging.WARNING):
        assert isinstance(resolve(base_env(home), "oss"), AnonymousSource)
    assert "mode ChainableRamRoleArn is not supported" in caplog.text


def test_ossutil_config_comes_before_aliyun(home: Path) -> None:
    aliyun_config(home)
    write(home / ".ossutilconfig", "[Credentials]\naccessKeyID=U\naccessKeySecret=u\n")
    assert resolve(base_env(home), "oss").get() == Credentials("U", "u")


def test_oss_unknown_profile_is_an_error(home: Path) -> None:
    aliyun_config(home)
    with pytest.raises(UsageError, match="profile nope not found"):
        resolve(base_env(home), "oss", ChainOptions(profile="nope"))


# -- AWS files -------------------------------------------------------------------------------


def aws_files(home: Path) -> None:
    write(
        home / ".aws" / "credentials",
        "[default]\naws_access_key_id = DEFAK\naws_secret_access_key = defsk\n"
        "[dev]\naws_access_key_id = DEVAK\naws_secret_access_key = devsk\n"
        "aws_session_token = devtok\n",
    )
    write(
        home / ".aws" / "config",
        "[default]\nregion = us-east-1\n"
        "[profile cfg]\naws_access_key_id = CFGAK\naws_secret_access_key = cfgsk\n"
        "[profile dev]\naws_access_key_id = NOTME\naws_secret_access_key = notme\n",
    )


def test_aws_default_profile(home: Path) -> None:
    aws_files(home)
    source = resolve(base_env(home), "s3")
    assert source.name == "~/.aws/credentials profile default"
    assert source.get() == Credentials("DEFAK", "defsk")


def test_aws_profile_option_env_and_config_file(home: Path) -> None:
    aws_files(home)
    source = resolve(base_env(home), "s3", ChainOptions(profile="dev"))
    assert source.name == "~/.aws/credentials profile dev"  # credentials file wins over config
    assert source.get() == Credentials("DEVAK", "devsk", "devtok")
    source = resolve(base_env(home, AWS_PROFILE="cfg"), "s3")
    assert source.name == "~/.aws/config profile cfg"
    assert source.get() == Credentials("CFGAK", "cfgsk")
    # --profile wins over AWS_PROFILE
    assert resolve(base_env(home, AWS_PROFILE="cfg"), "s3", ChainOptions(profile="dev")).get() == (
        Credentials("DEVAK", "devsk", "devtok")
    )


def test_aws_file_overrides(home: Path, tmp_path: Path) -> None:
    creds = write(tmp_path / "c", "[default]\naws_access_key_id=X\naws_secret_access_key=x\n")
    source = resolve(base_env(home, AWS_SHARED_CREDENTIALS_FILE=str(creds)), "s3")
    assert source.name == f"{creds} profile default"
    conf = write(tmp_path / "k", "[profile p]\naws_access_key_id=Y\naws_secret_access_key=y\n")
    env = base_env(home, AWS_CONFIG_FILE=str(conf), AWS_PROFILE="p")
    assert resolve(env, "s3").get() == Credentials("Y", "y")


def test_aws_unknown_profile_is_an_error(home: Path) -> None:
    aws_files(home)
    with pytest.raises(UsageError, match=r"profile nope has no keys in ~/\.aws/credentials"):
        resolve(base_env(home), "s3", ChainOptions(profile="nope"))


# -- the order --------------------------------------------------------------------------------


def test_chain_order_s3(home: Path, tmp_path: Path) -> None:
    aws_files(home)
    passwd = write(tmp_path / "passwd", "FILEAK:filesk\n")
    env = base_env(home, AWS_ACCESS_KEY_ID="ENVAK", AWS_SECRET_ACCESS_KEY="envsk")
    options = ChainOptions(credentials_file=str(passwd))
    source = resolve(env, "s3", options)
    assert (source.name, source.get()) == ("environment (AWS_*)", Credentials("ENVAK", "envsk"))
    source = resolve(base_env(home), "s3", options)
    assert source.name == f"credentials file {passwd}"
    assert source.get() == Credentials("FILEAK", "filesk")
    assert resolve(base_env(home), "s3").name == "~/.aws/credentials profile default"
    anonymous = ChainOptions(credentials_file=str(passwd), anonymous=True)
    assert isinstance(resolve(env, "s3", anonymous), AnonymousSource)


def test_chain_order_oss(home: Path, tmp_path: Path) -> None:
    aliyun_config(home)
    passwd = write(tmp_path / "passwd", "bkt:FILEAK:filesk\n")
    env = base_env(home, OSS_ACCESS_KEY_ID="ENVAK", OSS_ACCESS_KEY_SECRET="envsk")
    options = ChainOptions(credentials_file=str(passwd))
    assert resolve(env, "oss", options).name == "environment (OSS_*)"
    assert resolve(base_env(home), "oss", options).get() == Credentials("FILEAK", "filesk")
    # a file without a line for this bucket: on to the next source
    assert resolve(base_env(home), "oss", options, bucket="x").name.startswith("~/.aliyun")


def test_files_before_instance_role(home: Path) -> None:
    aws_files(home)
    with MetadataServer("ec2", [("ROLEAK", "rolesk")]) as meta:
        env = base_env(home, **{EC2_METADATA_ENV: meta.endpoint})
        env.pop("AWS_EC2_METADATA_DISABLED")
        assert resolve(env, "s3").name == "~/.aws/credentials profile default"
        assert meta.counts["credentials"] == 0
        (home / ".aws" / "credentials").unlink()
        (home / ".aws" / "config").unlink()
        source = resolve(env, "s3")
        assert source.name == "EC2 instance role test-role"
        assert source.get() == Credentials("ROLEAK", "rolesk", "token-0")


def test_oss_with_only_aws_keys_says_so(home: Path) -> None:
    env = base_env(home, AWS_ACCESS_KEY_ID="A", AWS_SECRET_ACCESS_KEY="s")
    source = resolve(env, "oss")
    assert isinstance(source, AnonymousSource)
    assert "oss:// reads OSS_* variables" in source.hint
    env = base_env(home, OSS_ACCESS_KEY_ID="A", OSS_ACCESS_KEY_SECRET="s")
    assert "s3:// reads AWS_* variables" in resolve(env, "s3").hint
    assert resolve(base_env(home), "s3").hint == ""


# -- metadata services --------------------------------------------------------------------------


def test_ecs_ram_role(home: Path) -> None:
    with MetadataServer("ecs", [("ECSAK", "ecssk")], role="myrole") as meta:
        env = base_env(home, **{ECS_METADATA_ENV: meta.endpoint})
        env.pop("ALIBABA_CLOUD_ECS_METADATA_DISABLED")
        source = resolve(env, "oss")
        assert source.name == "ECS RAM role myrole"
        assert source.get() == Credentials("ECSAK", "ecssk", "token-0")
        assert meta.counts["role"] == 1


def test_aliyun_ecs_ram_role_profile(home: Path) -> None:
    aliyun_config(home, "r", [{"name": "r", "mode": "EcsRamRole", "ram_role_name": "named"}])
    with MetadataServer("ecs", [("ECSAK", "ecssk")], role="named") as meta:
        env = base_env(home, **{ECS_METADATA_ENV: meta.endpoint})
        source = resolve(env, "oss")
        assert source.name == "ECS RAM role named (~/.aliyun/config.json profile r)"
        assert source.get() == Credentials("ECSAK", "ecssk", "token-0")
        assert meta.counts["role"] == 0  # the role is named: not asked for


def test_imdsv2_needs_the_token(home: Path) -> None:
    with MetadataServer("ec2", [("A", "a")]) as meta:
        env = base_env(home, **{EC2_METADATA_ENV: meta.endpoint + "/"})
        env.pop("AWS_EC2_METADATA_DISABLED")
        resolve(env, "s3")
        assert meta.counts["token"] >= 2 and meta.counts["refused"] == 0


def test_overridden_metadata_endpoint_unreachable_is_an_error(home: Path) -> None:
    with MetadataServer("ec2", [("A", "a")]) as meta:
        endpoint = meta.endpoint
    env = base_env(home, **{EC2_METADATA_ENV: endpoint})
    env.pop("AWS_EC2_METADATA_DISABLED")
    with pytest.raises(UsageError, match=f"{EC2_METADATA_ENV}.*cannot connect"):
        resolve(env, "s3")


def test_metadata_disabled_means_anonymous(home: Path) -> None:
    with MetadataServer("ec2", [("A", "a")]) as meta:
        env = base_env(home, **{EC2_METADATA_ENV: meta.endpoint})
        assert isinstance(resolve(env, "s3"), AnonymousSource)
        assert meta.counts["credentials"] == 0


# -- refresh --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Fetcher:
    """Hands out key pair n, valid for `lifetime`, or fails when told to."""

    def __init__(self, clock: Clock, lifetime: float) -> None:
        self.clock, self.lifetime = clock, lifetime
        self.calls = 0
        self.fail = False

    def __call__(self) -> tuple[Credentials, float | None]:
        self.calls += 1
        if self.fail:
            raise CredentialsError("metadata service http://x: cannot connect")
        return Credentials(f"AK{self.calls}", f"sk{self.calls}"), self.clock.now + self.lifetime


def refreshing(lifetime: float) -> tuple[RefreshingSource, Clock, Fetcher]:
    clock = Clock()
    fetch = Fetcher(clock, lifetime)
    return RefreshingSource("test role", fetch, clock=clock), clock, fetch


def test_refresh_five_minutes_before_a_long_lived_key_expires() -> None:
    source, clock, fetch = refreshing(3600)
    assert source.get().access_key_id == "AK1"
    clock.now += 3600 - 301
    assert source.get().access_key_id == "AK1" and fetch.calls == 1
    clock.now += 2
    assert source.get().access_key_id == "AK2" and fetch.calls == 2


def test_refresh_at_ten_percent_of_a_short_lifetime() -> None:
    source, clock, fetch = refreshing(100)
    source.get()
    clock.now += 89
    assert source.get().access_key_id == "AK1"
    clock.now += 2  # 9 s left: less than 10% of 100 s
    assert source.get().access_key_id == "AK2"
    for _ in range(5):
        source.get()
    assert fetch.calls == 2  # not fetched on every request


def test_failed_refresh_keeps_old_keys_until_expiry(caplog: pytest.LogCaptureFixture) -> None:
    source, clock, fetch = refreshing(3600)
    source.get()
    fetch.fail = True
    clock.now += 3600 - 200
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert source.get().access_key_id == "AK1"
            clock.now += 20  # past the retry interval: tried again each time
    assert fetch.calls == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot refresh credentials from test role" in warnings[0].message
    clock.now += 200  # now expired
    with pytest.raises(CredentialsError, match=r"credentials from test role: .*cannot connect"):
        source.get()
    fetch.fail = False
    assert source.get().access_key_id == "AK6"


def test_retry_interval_limits_attempts_while_failing() -> None:
    source, clock, fetch = refreshing(3600)
    source.get()
    fetch.fail = True
    clock.now += 3600 - 100
    for _ in range(10):
        source.get()
    assert fetch.calls == 2


def test_one_thread_refreshes_the_others_keep_signing() -> None:
    clock = Clock()
    started, release = threading.Event(), threading.Event()
    calls = []

    def fetch() -> tuple[Credentials, float | None]:
        calls.append(1)
        if len(calls) == 2:
            started.set()
            release.wait(10)
        return Credentials(f"AK{len(calls)}", "s"), clock.now + 3600

    source = RefreshingSource("r", fetch, clock=clock)
    source.get()
    clock.now += 3400
    t = threading.Thread(target=source.get)
    t.start()
    assert started.wait(10)
    assert source.get().access_key_id == "AK1"  # not blocked by the refresh
    release.set()
    t.join(10)
    assert source.get().access_key_id == "AK2" and len(calls) == 2


# -- the client signs with the current keys -------------------------------------------------------


class Recorder:
    """Stands in for StoreClient._send: records the Authorization header, answers 403/200."""

    def __init__(self) -> None:
        self.auth: list[str] = []
        self.status = 200

    def __call__(self, method, url, path, qs, headers, stream, data=None) -> Any:
        self.auth.append(headers.get("Authorization", ""))
        body = b"<Error><Code>AccessDenied</Code></Error>" if self.status >= 300 else b""
        return _Answer(
            self.status,
            Headers(
                [
                    ("Content-Length", "5"),
                    ("ETag", '"abc"'),
                    ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
                ]
            ),
            body,
        )


@dataclass
class _Answer:
    """What the client reads of a transport response."""

    status_code: int
    headers: Headers
    content: bytes
    reason: str = ""

    def close(self) -> None:
        pass

    release = close


def client_with(provider, recorder: Recorder, protocol: str = "s3") -> StoreClient:
    config = StoreConfig(
        protocol=protocol,  # type: ignore[arg-type]
        endpoint="http://127.0.0.1:9",
        bucket="bkt",
        credentials_provider=provider,
        max_attempts=1,
    )
    client = StoreClient(config)
    client._send = recorder  # type: ignore[method-assign]
    return client


def test_expired_then_refreshed_key_signs_the_next_request() -> None:
    source, clock, fetch = refreshing(600)
    recorder = Recorder()
    client = client_with(source, recorder)
    client.head("a")
    clock.now += 601
    client.head("a")
    assert "Credential=AK1/" in recorder.auth[0]
    assert "Credential=AK2/" in recorder.auth[1]
    assert fetch.calls == 2


def test_refresh_failure_after_expiry_fails_the_request_clearly() -> None:
    source, clock, fetch = refreshing(600)
    client = client_with(source, Recorder())
    client.head("a")
    clock.now += 601
    fetch.fail = True
    with pytest.raises(CredentialsError, match="credentials from test role"):
        client.head("a")


def test_access_denied_names_the_source() -> None:
    recorder = Recorder()
    recorder.status = 403
    source = StaticSource("~/.aws/credentials profile dev", Credentials("A", "s"))
    with pytest.raises(AccessDeniedError) as info:
        client_with(source, recorder).list_page("", "/", max_keys=1)
    assert str(info.value).endswith("(credentials from ~/.aws/credentials profile dev)")


def test_access_denied_anonymous_oss_with_aws_keys_hint(home: Path) -> None:
    recorder = Recorder()
    recorder.status = 403
    env = base_env(home, AWS_ACCESS_KEY_ID="A", AWS_SECRET_ACCESS_KEY="s")
    source = resolve(env, "oss")
    with pytest.raises(StoreError) as info:
        client_with(source, recorder, "oss").list_page("", "/", max_keys=1)
    message = str(info.value)
    assert "anonymous access was refused" in message
    assert "oss:// reads OSS_* variables" in message
    assert recorder.auth == [""]  # unsigned


def test_static_credentials_still_work() -> None:
    recorder = Recorder()
    config = StoreConfig(
        protocol="s3",
        endpoint="http://127.0.0.1:9",
        bucket="bkt",
        credentials=Credentials("OLD", "s"),
        max_attempts=1,
    )
    client = StoreClient(config)
    client._send = recorder  # type: ignore[method-assign]
    client.head("a")
    assert "Credential=OLD/" in recorder.auth[0]
    assert not config.anonymous


@pytest.fixture(autouse=True)
def _no_real_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Chain(env=...) is given its environment; make sure nothing reads the real one."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "OSS_", "ALIBABA_")):
            monkeypatch.delenv(name)
    yield
