"""Where a client's keys come from: a chain of sources tried in a documented order.

For ``s3://``:

1. environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``;
2. a credentials file given with ``--credentials-file`` (s3fs/ossfs passwd format);
3. ``~/.aws/credentials`` then ``~/.aws/config``, profile ``--profile``, else ``$AWS_PROFILE``,
   else ``default`` (the files: ``$AWS_SHARED_CREDENTIALS_FILE``, ``$AWS_CONFIG_FILE``);
4. the EC2 instance role (IMDSv2, ``$AWS_EC2_METADATA_SERVICE_ENDPOINT`` overrides the address).

For ``oss://``:

1. environment: ``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET``, ``OSS_SESSION_TOKEN``;
2. a credentials file given with ``--credentials-file``;
3. the ossutil config ``~/.ossutilconfig`` (``[Credentials]``, or with ``--profile`` that
   section), then the Alibaba Cloud CLI config ``~/.aliyun/config.json`` (profile ``--profile``,
   else its ``current``);
4. the ECS RAM role (``$OSSFS_RESUME_ECS_METADATA_ENDPOINT`` overrides the address).

The first source that has keys is used; with none, requests go unsigned (anonymous).
Temporary credentials (an instance role's) are refreshed before they expire. Secrets are
never logged: sources are named by where the keys came from, never by the keys.
"""

from __future__ import annotations

import configparser
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

from .client import credentials_from_env, parse_iso8601
from .errors import OssfsError, UsageError
from .signing import Credentials

log = logging.getLogger(__name__)

ECS_METADATA_ENV = "OSSFS_RESUME_ECS_METADATA_ENDPOINT"
EC2_METADATA_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
ECS_METADATA_DEFAULT = "http://100.100.100.200"
EC2_METADATA_DEFAULT = "http://169.254.169.254"
#: Seconds to wait for the default metadata address: a laptop has none and must not wait long.
METADATA_TIMEOUT = 1.0
#: Refresh temporary credentials when less than this, or 10% of their lifetime, remains
#: (the smaller of the two, so short-lived keys are not fetched on every request).
REFRESH_MARGIN = 300.0
REFRESH_FRACTION = 0.1
#: After a failed refresh, wait this long before the next try (while the old keys still work).
RETRY_INTERVAL = 10.0

Clock = Callable[[], float]


class CredentialsError(OssfsError):
    """Keys could not be obtained (or renewed) from the source in use."""

    errno = errno.EACCES


@dataclass(frozen=True)
class ChainOptions:
    """What the user chose: a passwd-format file, a profile name, or no keys at all."""

    credentials_file: str | None = None
    profile: str | None = None
    anonymous: bool = False


# --------------------------------------------------------------------------- sources


class CredentialSource:
    """Where keys come from. ``get()`` returns the keys to sign the next request with
    (None: anonymous). ``hint`` is said alongside an access-denied error."""

    name: str = "no credentials (anonymous)"
    hint: str = ""
    anonymous: bool = False

    def get(self) -> Credentials | None:
        return None


class AnonymousSource(CredentialSource):
    anonymous = True

    def __init__(self, hint: str = "") -> None:
        self.hint = hint


class StaticSource(CredentialSource):
    """Keys that do not change (environment, files)."""

    def __init__(self, name: str, credentials: Credentials) -> None:
        self.name = name
        self._credentials = credentials

    def get(self) -> Credentials:
        return self._credentials


#: Fetches keys and their expiry (seconds since the epoch; None: they do not expire).
Fetcher = Callable[[], tuple[Credentials, float | None]]


class RefreshingSource(CredentialSource):
    """Temporary keys, fetched again before they expire; thread-safe.

    One thread refreshes while the others keep signing with the current keys (they wait
    only once the keys have expired). A failed refresh keeps the old keys until they
    actually expire, logs one warning, and is retried every ``retry_interval`` seconds.
    """

    def __init__(
        self,
        name: str,
        fetch: Fetcher,
        *,
        clock: Clock = time.time,
        margin: float = REFRESH_MARGIN,
        fraction: float = REFRESH_FRACTION,
        retry_interval: float = RETRY_INTERVAL,
        initial: tuple[Credentials, float | None] | None = None,
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._clock = clock
        self._margin = margin
        self._fraction = fraction
        self._retry_interval = retry_interval
        self._lock = threading.Lock()
        self._credentials: Credentials | None = None
        self._expires: float | None = None
        self._refresh_at = 0.0
        self._failing = False
        self.refreshes = 0
        if initial is not None:
            self._store(*initial)

    def _store(self, credentials: Credentials, expires: float | None) -> None:
        now = self._clock()
        self._credentials, self._expires = credentials, expires
        self._failing = False
        if expires is None:
            self._refresh_at = float("inf")
        else:
            lifetime = max(0.0, expires - now)
            self._refresh_at = expires - min(self._margin, lifetime * self._fraction)

    def _expired(self, now: float) -> bool:
        return self._credentials is None or (self._expires is not None and now >= self._expires)

    def get(self) -> Credentials:
        now = self._clock()
        if now < self._refresh_at and self._credentials is not None:
            return self._credentials
        if not self._expired(now):
            # Due for a refresh but still valid: one thread refreshes, the others go on.
            if not self._lock.acquire(blocking=False):
                return self._credentials  # type: ignore[return-value]
        else:
            self._lock.acquire()
        try:
            return self._refresh_locked()
        finally:
            self._lock.release()

    def _refresh_locked(self) -> Credentials:
        now = self._clock()
        if now < self._refresh_at and self._credentials is not None:
            return self._credentials  # another thread refreshed meanwhile
        try:
            credentials, expires = self._fetch()
        except OssfsError as exc:
            if self._expired(now):
                raise CredentialsError(f"credentials from {self.name}: {exc}") from None
            if not self._failing:
                left = (self._expires or now) - now
                log.warning(
                    "cannot refresh credentials from %s: %s; using the current ones "
                    "(they expire in %.0f s)",
                    self.name,
                    exc,
                    left,
                )
            self._failing = True
            self._refresh_at = min(now + self._retry_interval, self._expires or now)
            return self._credentials  # type: ignore[return-value]
        if self._failing:
            log.warning("credentials from %s refreshed again", self.name)
        self._store(credentials, expires)
        self.refreshes += 1
        log.info(
            "credentials from %s (key id %s) %s",
            self.name,
            credentials.access_key_id,
            "" if expires is None else f"valid for {expires - self._clock():.0f} s",
        )
        return credentials


# --------------------------------------------------------------------------- file formats


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or os.path.expanduser("~"))


def _display(path: Path, env: Mapping[str, str]) -> str:
    """``path`` with the home directory shown as ``~``."""
    try:
        return "~/" + str(path.relative_to(_home(env)))
    except ValueError:
        return str(path)


def read_passwd_file(path: str | Path, bucket: str) -> Credentials | None:
    """Keys for ``bucket`` from an s3fs/ossfs passwd file: ``AK:SK`` or ``bucket:AK:SK`` lines.

    A line naming the bucket wins over a generic one; ``#`` starts a comment line. The file
    must not be readable by group or others (as s3fs insists). None: no line applies.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"credentials file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read credentials file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"credentials file {path} is readable by others (mode {stat.S_IMODE(mode):04o}): "
            f"chmod 600 {path}"
        )
    generic: Credentials | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) == 2 and all(fields):
            if generic is None:
                generic = Credentials(fields[0], fields[1])
        elif len(fields) == 3 and all(fields):
            if fields[0] == bucket:
                return Credentials(fields[1], fields[2])
        else:
            # Never quote the line: it holds a secret.
            raise UsageError(
                f"credentials file {path} line {number}: expected AK:SK or BUCKET:AK:SK"
            )
    return generic


def _read_ini(path: Path) -> configparser.ConfigParser | None:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open() as f:
            parser.read_file(f)
    except FileNotFoundError:
        return None
    except (OSError, configparser.Error, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    return parser


def read_ossutil_config(path: Path, profile: str | None = None) -> Credentials | None:
    """Keys from ossutil's config: section ``[Credentials]`` (ossutil 1) or ``[default]``
    (ossutil 2), or the section named ``profile``; keys ``accessKeyID``, ``accessKeySecret``,
    ``stsToken`` (any case). None: no file or no keys in it."""
    parser = _read_ini(path)
    if parser is None:
        return None
    sections = [profile] if profile else ["Credentials", "default"]
    for name in sections:
        if not parser.has_section(name):
            continue
        sect = parser[name]
        key_id, secret = sect.get("accesskeyid"), sect.get("accesskeysecret")
        if key_id and secret:
            token = sect.get("ststoken") or sect.get("securitytoken") or None
            return Credentials(key_id.strip(), secret.strip(), token)
    return None


def read_aliyun_config(
    path: Path, profile: str | None = None
) -> tuple[str, Credentials | None, str | None] | None:
    """(profile name, keys, ECS RAM role name) from the Alibaba Cloud CLI's config.json.

    Mode ``AK`` and ``StsToken`` give keys; ``EcsRamRole`` gives a role name. Other modes
    are not supported: logged and skipped. None: no file, or no such profile.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"cannot read {path}: expected a JSON object")
    name = profile or data.get("current") or "default"
    for entry in data.get("profiles") or []:
        if not isinstance(entry, dict) or entry.get("name") != name:
            continue
        mode = entry.get("mode") or "AK"
        if mode in ("AK", "StsToken"):
            key_id, secret = entry.get("access_key_id"), entry.get("access_key_secret")
            if not key_id or not secret:
                return None
            token = entry.get("sts_token") if mode == "StsToken" else None
            return name, Credentials(key_id, secret, token or None), None
        if mode == "EcsRamRole" and entry.get("ram_role_name"):
            return name, None, str(entry["ram_role_name"])
        log.warning("%s profile %s: mode %s is not supported; skipped", path, name, mode)
        return None
    return None


def read_aws_profile(
    credentials_path: Path, config_path: Path, profile: str
) -> tuple[Path, Credentials] | None:
    """Keys of ``profile``: ``[NAME]`` in the credentials file, else ``[profile NAME]``
    (``[default]`` for the default) in the config file. None: neither has keys for it."""
    candidates = [(credentials_path, profile)]
    candidates.append((config_path, "default" if profile == "default" else f"profile {profile}"))
    for path, section in candidates:
        parser = _read_ini(path)
        if parser is None or not parser.has_section(section):
            continue
        sect = parser[section]
        key_id, secret = sect.get("aws_access_key_id"), sect.get("aws_secret_access_key")
        if key_id and secret:
            token = sect.get("aws_session_token") or sect.get("aws_security_token") or None
            return path, Credentials(key_id.strip(), secret.strip(), token)
    return None


# --------------------------------------------------------------------------- metadata services


def _meta_error(endpoint: str, exc: Exception) -> CredentialsError:
    reason = type(exc).__name__
    if isinstance(exc, requests.Timeout):
        reason = "timed out"
    elif isinstance(exc, requests.ConnectionError):
        reason = "cannot connect"
    elif isinstance(exc, requests.HTTPError) and exc.response is not None:
        reason = f"HTTP {exc.response.status_code}"
    elif isinstance(exc, (ValueError, KeyError)):
        reason = "unexpected answer"
    return CredentialsError(f"metadata service {endpoint}: {reason}")


def _attached_role(
    endpoint: str, path: str, kind: str, timeout: float, headers: dict[str, str] | None = None
) -> str:
    """The first role a metadata service lists at `path` (ECS and EC2 list them alike)."""
    try:
        resp = requests.get(f"{endpoint}{path}", headers=headers, timeout=timeout)
        resp.raise_for_status()
    except requests.RequestException as exc:
        raise _meta_error(endpoint, exc) from None
    role = resp.text.strip().splitlines()[0].strip() if resp.text.strip() else ""
    if not role:
        raise CredentialsError(f"metadata service {endpoint}: no {kind} role attached")
    return role


def ecs_role_name(endpoint: str, timeout: float) -> str:
    """The RAM role attached to this ECS instance."""
    return _attached_role(endpoint, "/latest/meta-data/ram/security-credentials/", "RAM", timeout)


def fetch_ecs_role(endpoint: str, role: str, timeout: float) -> tuple[Credentials, float | None]:
    url = f"{endpoint}/latest/meta-data/ram/security-credentials/{role}"
    try:
        resp = requests.get(url, timeout=timeout)
        resp.raise_for_status()
        data = resp.json()
        if data.get("Code", "Success") != "Success":
            raise CredentialsError(f"metadata service {endpoint}: role {role}: {data['Code']}")
        creds = Credentials(
            data["AccessKeyId"], data["AccessKeySecret"], data.get("SecurityToken") or None
        )
        expires = parse_iso8601(data["Expiration"]) if data.get("Expiration") else None
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        raise _meta_error(endpoint, exc) from None
    return creds, expires


def _imds_headers(endpoint: str, timeout: float) -> dict[str, str]:
    """IMDSv2 session token header; {} where only IMDSv1 is offered."""
    try:
        resp = requests.put(
            f"{endpoint}/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise _meta_error(endpoint, exc) from None
    if resp.status_code in (403, 404, 405):
        return {}
    if resp.status_code != 200:
        raise CredentialsError(f"metadata service {endpoint}: token: HTTP {resp.status_code}")
    return {"X-aws-ec2-metadata-token": resp.text.strip()}


def ec2_role_name(endpoint: str, timeout: float) -> str:
    """The IAM role attached to this EC2 instance (IMDSv2 where offered)."""
    headers = _imds_headers(endpoint, timeout)
    path = "/latest/meta-data/iam/security-credentials/"
    return _attached_role(endpoint, path, "IAM", timeout, headers)


def fetch_ec2_role(endpoint: str, role: str, timeout: float) -> tuple[Credentials, float | None]:
    headers = _imds_headers(endpoint, timeout)
    try:
        resp = requests.get(
            f"{endpoint}/latest/meta-data/iam/security-credentials/{role}",
            headers=headers,
            timeout=timeout,
        )
        resp.raise_for_status()
        data = resp.json()
        if data.get("Code", "Success") != "Success":
            raise CredentialsError(f"metadata service {endpoint}: role {role}: {data['Code']}")
        creds = Credentials(data["AccessKeyId"], data["SecretAccessKey"], data.get("Token") or None)
        expires = parse_iso8601(data["Expiration"]) if data.get("Expiration") else None
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        raise _meta_error(endpoint, exc) from None
    return creds, expires


# --------------------------------------------------------------------------- the chain


def _disabled(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


@dataclass
class Chain:
    """Resolves the source of keys for one bucket: see the module docstring for the order."""

    env: Mapping[str, str] | None = None
    clock: Clock = time.time

    def resolve(self, protocol: str, bucket: str, options: ChainOptions) -> CredentialSource:
        env = os.environ if self.env is None else self.env
        if options.anonymous:
            return AnonymousSource()
        creds = credentials_from_env(protocol, env)  # type: ignore[arg-type]
        if creds is not None:
            names = "OSS_*" if protocol == "oss" else "AWS_*"
            return StaticSource(f"environment ({names})", creds)
        if options.credentials_file:
            creds = read_passwd_file(options.credentials_file, bucket)
            if creds is not None:
                return StaticSource(f"credentials file {options.credentials_file}", creds)
            log.info("credentials file %s has no line for %s", options.credentials_file, bucket)
        source = (
            self._oss_files(env, options) if protocol == "oss" else self._aws_files(env, options)
        )
        if source is not None:
            return source
        source = self._instance_role(protocol, env)
        if source is not None:
            return source
        return AnonymousSource(self._other_protocol_hint(protocol, env))

    def _oss_files(self, env: Mapping[str, str], options: ChainOptions) -> CredentialSource | None:
        home = _home(env)
        path = home / ".ossutilconfig"
        creds = read_ossutil_config(path, options.profile)
        if creds is not None:
            suffix = f" profile {options.profile}" if options.profile else ""
            return StaticSource(f"{_display(path, env)}{suffix}", creds)
        path = home / ".aliyun" / "config.json"
        profile = options.profile or env.get("ALIBABA_CLOUD_PROFILE") or None
        found = read_aliyun_config(path, profile)
        if found is not None:
            name, creds, role = found
            where = f"{_display(path, env)} profile {name}"
            if creds is not None:
                return StaticSource(where, creds)
            assert role is not None
            endpoint, timeout = self._endpoint(env, ECS_METADATA_ENV, ECS_METADATA_DEFAULT)
            return self._role_source(
                f"ECS RAM role {role} ({where})",
                lambda: fetch_ecs_role(endpoint, role, timeout),
            )
        if options.profile:
            raise UsageError(
                f"profile {options.profile} not found in {_display(home / '.ossutilconfig', env)}"
                f" or {_display(path, env)}"
            )
        return None

    def _aws_files(self, env: Mapping[str, str], options: ChainOptions) -> CredentialSource | None:
        home = _home(env)
        cred_path = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")
        conf_path = Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config")
        profile = options.profile or env.get("AWS_PROFILE") or "default"
        found = read_aws_profile(cred_path, conf_path, profile)
        if found is not None:
            path, creds = found
            return StaticSource(f"{_display(path, env)} profile {profile}", creds)
        if options.profile or env.get("AWS_PROFILE"):
            raise UsageError(
                f"profile {profile} has no keys in {_display(cred_path, env)} "
                f"or {_display(conf_path, env)}"
            )
        return None

    def _endpoint(self, env: Mapping[str, str], variable: str, default: str) -> tuple[str, float]:
        override = env.get(variable)
        if override:
            return override.rstrip("/"), 5.0
        return default, METADATA_TIMEOUT

    def _role_source(self, name: str, fetch: Fetcher) -> RefreshingSource:
        # The first fetch now: a missing role or unreachable service is one clear error.
        return RefreshingSource(name, fetch, clock=self.clock, initial=fetch())

    def _instance_role(self, protocol: str, env: Mapping[str, str]) -> CredentialSource | None:
        if protocol == "oss":
            variable, default = ECS_METADATA_ENV, ECS_METADATA_DEFAULT
            disabled = _disabled(env.get("ALIBABA_CLOUD_ECS_METADATA_DISABLED"))
            what, role_name, fetch_role = "ECS RAM role", ecs_role_name, fetch_ecs_role
        else:
            variable, default = EC2_METADATA_ENV, EC2_METADATA_DEFAULT
            disabled = _disabled(env.get("AWS_EC2_METADATA_DISABLED"))
            what, role_name, fetch_role = "EC2 instance role", ec2_role_name, fetch_ec2_role
        if disabled:
            return None
        endpoint, timeout = self._endpoint(env, variable, default)
        overridden = bool(env.get(variable))
        try:
            role = role_name(endpoint, timeout)
            return self._role_source(f"{what} {role}", lambda: fetch_role(endpoint, role, timeout))
        except CredentialsError as exc:
            if overridden:  # the user pointed at it: not reaching it is an error
                raise UsageError(f"no {what} credentials ({variable}): {exc}") from None
            log.debug("no %s: %s", what, exc)
            return None

    @staticmethod
    def _other_protocol_hint(protocol: str, env: Mapping[str, str]) -> str:
        own, other, other_url = "OSS_*", "AWS_*", "s3://"
        if protocol == "s3":
            own, other, other_url = "AWS_*", "OSS_*", "oss://"
        prefix = other[:-1]
        if any(
            k.startswith(prefix) and k.endswith(("KEY_ID", "KEY_SECRET", "SECRET_ACCESS_KEY"))
            for k in env
        ):
            return f"{protocol}:// reads {own} variables; the {other} ones set are for {other_url}"
        return ""


def resolve(
    protocol: str, bucket: str, options: ChainOptions, env: Mapping[str, str] | None = None
) -> CredentialSource:
    """The source of keys for ``bucket``, logged by name (never the keys)."""
    source = Chain(env=env).resolve(protocol, bucket, options)
    log.info("%s://%s: credentials from %s", protocol, bucket, source.name)
    if source.hint:
        log.warning("%s://%s: no credentials found; %s", protocol, bucket, source.hint)
    return source
