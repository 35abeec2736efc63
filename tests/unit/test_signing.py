"""Signatures from ossfs_resume.signing must equal the official SDKs' for the same request.

Oracles, all computing the answer at test time from the same inputs and a
fixed clock:

* OSS V4: alibabacloud_oss_v2 ``SignerV4`` (whole Authorization header) and
  oss2 ``ProviderAuthV4`` (signature), plus the V2 SDK's published vectors.
* OSS V1: alibabacloud_oss_v2 ``SignerV1`` and oss2 ``Auth`` / ``StsAuth``,
  plus the V2 SDK's published vectors.
* S3 SigV4: botocore ``S3SigV4Auth``.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, unquote, urlencode

import pytest

from ossfs_resume.signing import (
    Credentials,
    canonical_query,
    encode_key_path,
    sign_oss_v1,
    sign_oss_v4,
    sign_s3_v4,
    uri_encode,
)

NOW = datetime(2024, 3, 5, 7, 8, 9, tzinfo=timezone.utc)
REGION = "cn-hangzhou"
BUCKET = "examplebucket"
ETAG = '"5B3C1A2E053D763E1B002CC607C5A0FE"'

# A key exercising everything a naive encoder gets wrong.
AWKWARD_KEY = "dir one/ünï cødé+plus=eq//double~tilde_-.txt"

CREDS = {
    "no-token": Credentials("LTAI-test-ak", "test-secret/+="),
    "token": Credentials("STS.test-ak", "test-secret/+=", "sts+token/with=chars&more"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One request, as the HTTP client would hand it to a signer."""

    method: str
    key: str  # "" for a bucket-level request
    query: dict[str, str | None]
    headers: dict[str, str]


OBJECT_HEADERS = {
    "Range": "bytes=0-1048575",
    "If-Match": ETAG,
    "x-oss-range-behavior": "standard",
    "Accept-Encoding": "identity",
}

CASES = {
    "get-range-if-match": Case("GET", AWKWARD_KEY, {}, OBJECT_HEADERS),
    "get-unicode-only": Case("GET", "日本語/ファイル名.bin", {}, OBJECT_HEADERS),
    "head": Case("HEAD", "a b/c+d=e~f", {}, {"Accept-Encoding": "identity"}),
    "list-v2": Case(
        "GET",
        "",
        {
            "list-type": "2",
            "prefix": "dir one/ü+x=",
            "delimiter": "/",
            "max-keys": "1000",
            "continuation-token": "CgR0ZXN0+/==",
            "encoding-type": "url",
        },
        {"Accept-Encoding": "identity"},
    ),
    "list-v2-first-page": Case(
        "GET",
        "",
        {"list-type": "2", "prefix": "", "delimiter": "/", "encoding-type": "url"},
        {},
    ),
    "get-subresources": Case(
        "GET",
        "k ey",
        {
            "versionId": "CAEQNhiBgM0BYiIDc4MGZjZGI2OTBjOTRmNTE5NmU5NmFhZjhjYmY0****",
            "response-content-type": "text/plain; charset=utf-8",
            "response-content-disposition": 'attachment; filename="a b.txt"',
        },
        {"Range": "bytes=10-19", "x-oss-range-behavior": "standard"},
    ),
    # Dot segments: the key is signed as typed, never resolved (see encode_key_path).
    "dot-dot-escapes-bucket": Case("HEAD", "a/../../x", {}, {"Accept-Encoding": "identity"}),
    "dot-first": Case("GET", "./k", {}, OBJECT_HEADERS),
    "dot-middle": Case("GET", "a/./b", {}, OBJECT_HEADERS),
    "dot-dot-alone": Case("HEAD", "..", {}, {}),
}


def _params(cases: dict[str, Any]) -> list[Any]:
    return [pytest.param(v, id=k) for k, v in cases.items()]


CASE_PARAMS = _params(CASES)
CREDS_PARAMS = _params(CREDS)


def _sdk_query(query: dict[str, str | None]) -> str:
    """Query as alibabacloud_oss_v2's client builds it (urlencode + quote), bare keys for None."""
    with_values = {k: v for k, v in query.items() if v is not None}
    parts = [urlencode(with_values, quote_via=quote)] if with_values else []
    parts += [quote(k, safe="") for k, v in query.items() if v is None]
    return "&".join(parts)


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _signature(authorization: str) -> str:
    m = re.search(r"Signature=([0-9a-f]{64})", authorization)
    assert m, authorization
    return m.group(1)


# --------------------------------------------------------------------------- OSS V4


def _oss_v2_sign(
    signer_name: str, case: Case, creds: Credentials, now: datetime, headers: dict[str, str]
) -> dict[str, str]:
    """Sign with alibabacloud_oss_v2 and return its headers, lower-cased."""
    signer_mod = pytest.importorskip("alibabacloud_oss_v2.signer")
    types = pytest.importorskip("alibabacloud_oss_v2.types")

    url = f"https://{BUCKET}.oss-{REGION}.aliyuncs.com/{quote(case.key)}"
    if case.query:
        url += "?" + _sdk_query(case.query)
    request = types.HttpRequest(case.method, url)
    request.headers.update(headers)
    ctx = types.SigningContext(
        product="oss",
        region=REGION,
        bucket=BUCKET,
        key=case.key or None,
        request=request,
        credentials=types.Credentials(
            creds.access_key_id, creds.access_key_secret, creds.session_token
        ),
        signing_time=now,
    )
    getattr(signer_mod, signer_name)().sign(ctx)
    return _lower(dict(request.headers))


@pytest.mark.parametrize("creds", CREDS_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_oss_v4_matches_alibabacloud_oss_v2(case: Case, creds: Credentials) -> None:
    ours = dict(case.headers)
    sign_oss_v4(case.method, BUCKET, case.key, case.query, ours, creds, REGION, NOW)
    sdk = _oss_v2_sign("SignerV4", case, creds, NOW, case.headers)

    mine = _lower(ours)
    assert mine["authorization"] == sdk["authorization"]
    for name in ("x-oss-date", "x-oss-content-sha256", "date"):
        assert mine[name] == sdk[name]
    assert mine.get("x-oss-security-token") == creds.session_token
    assert mine["authorization"].startswith(
        f"OSS4-HMAC-SHA256 Credential={creds.access_key_id}/20240305/{REGION}/oss/"
        "aliyun_v4_request,Signature="
    )


@pytest.mark.parametrize("creds", CREDS_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_oss_v4_matches_oss2(
    case: Case, creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    oss2_auth = pytest.importorskip("oss2.auth")
    oss2_http = pytest.importorskip("oss2.http")

    class FixedDatetime(datetime):
        @classmethod
        def utcnow(cls) -> datetime:  # type: ignore[override]
            return NOW.replace(tzinfo=None)

    monkeypatch.setattr(oss2_auth, "datetime", FixedDatetime)

    ours = dict(case.headers)
    sign_oss_v4(case.method, BUCKET, case.key, case.query, ours, creds, REGION, NOW)

    req = oss2_http.Request(
        case.method,
        f"https://{BUCKET}.oss-{REGION}.aliyuncs.com/{quote(case.key)}",
        params={k: v or "" for k, v in case.query.items()},
        headers=dict(case.headers),
        region=REGION,
        product="oss",
    )
    if creds.session_token:
        auth = oss2_auth.StsAuth(
            creds.access_key_id,
            creds.access_key_secret,
            creds.session_token,
            auth_version=oss2_auth.AUTH_VERSION_4,
        )
    else:
        auth = oss2_auth.AuthV4(creds.access_key_id, creds.access_key_secret)
    auth._sign_request(req, BUCKET, case.key)

    assert _signature(_lower(ours)["authorization"]) == _signature(req.headers["authorization"])


# Published in aliyun/alibabacloud-oss-python-sdk-v2 tests/unit/signer/test_v4.py
# (test_auth_header, test_auth_header_with_token).
_V4_VECTOR_HEADERS = {
    "x-oss-head1": "value",
    "abc": "value",
    "ZAbc": "value",
    "XYZ": "value",
    "content-type": "text/plain",
    "x-oss-content-sha256": "UNSIGNED-PAYLOAD",
}
_V4_VECTOR_QUERY: dict[str, str | None] = {
    "param1": "value1",
    "+param1": "value3",
    "|param1": "value4",
    "+param2": "",
    "|param2": "",
    "param2": "",
}


@pytest.mark.parametrize(
    ("timestamp", "token", "expected"),
    [
        pytest.param(
            1702743657,
            None,
            "OSS4-HMAC-SHA256 Credential=ak/20231216/cn-hangzhou/oss/aliyun_v4_request,"
            "Signature=e21d18daa82167720f9b1047ae7e7f1ce7cb77a31e8203a7d5f4624fa0284afe",
            id="no-token",
        ),
        pytest.param(
            1702784856,
            "token",
            "OSS4-HMAC-SHA256 Credential=ak/20231217/cn-hangzhou/oss/aliyun_v4_request,"
            "Signature=b94a3f999cf85bcdc00d332fbd3734ba03e48382c36fa4d5af5df817395bd9ea",
            id="token",
        ),
    ],
)
def test_oss_v4_published_vectors(timestamp: int, token: str | None, expected: str) -> None:
    headers = dict(_V4_VECTOR_HEADERS)
    now = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    creds = Credentials("ak", "sk", token)
    sign_oss_v4("PUT", "bucket", "1234+-/123/1.txt", _V4_VECTOR_QUERY, headers, creds, REGION, now)
    assert headers["Authorization"] == expected


# --------------------------------------------------------------------------- OSS V1


@pytest.mark.parametrize("creds", CREDS_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_oss_v1_matches_alibabacloud_oss_v2(case: Case, creds: Credentials) -> None:
    ours = dict(case.headers)
    sign_oss_v1(case.method, BUCKET, case.key, case.query, ours, creds, NOW)

    # The V2 SDK's V1 signer sends the token in an unsigned "security-token"
    # header; OSS (and oss2) expect the signed x-oss-security-token, so give
    # the SDK that header up front.
    sdk_headers = dict(case.headers)
    if creds.session_token:
        sdk_headers["x-oss-security-token"] = creds.session_token
    sdk = _oss_v2_sign("SignerV1", case, creds, NOW, sdk_headers)

    mine = _lower(ours)
    assert mine["authorization"] == sdk["authorization"]
    assert mine["date"] == sdk["date"] == "Tue, 05 Mar 2024 07:08:09 GMT"
    assert mine.get("x-oss-security-token") == creds.session_token


@pytest.mark.parametrize("creds", CREDS_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_oss_v1_matches_oss2(
    case: Case, creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    oss2_auth = pytest.importorskip("oss2.auth")
    oss2_http = pytest.importorskip("oss2.http")
    monkeypatch.setattr(
        oss2_auth.utils, "http_date", lambda timeval=None: formatdate(NOW.timestamp(), usegmt=True)
    )

    ours = dict(case.headers)
    sign_oss_v1(case.method, BUCKET, case.key, case.query, ours, creds, NOW)

    req = oss2_http.Request(
        case.method,
        f"https://{BUCKET}.oss-{REGION}.aliyuncs.com/{quote(case.key)}",
        params={k: v or "" for k, v in case.query.items()},
        headers=dict(case.headers),
    )
    if creds.session_token:
        auth = oss2_auth.StsAuth(creds.access_key_id, creds.access_key_secret, creds.session_token)
    else:
        auth = oss2_auth.Auth(creds.access_key_id, creds.access_key_secret)
    auth._sign_request(req, BUCKET, case.key)

    mine = _lower(ours)
    assert mine["authorization"] == req.headers["authorization"]
    assert mine["date"] == req.headers["date"]
    assert mine.get("x-oss-security-token") == req.headers.get("x-oss-security-token")


_V1_VECTOR_HEADERS = {
    "Content-MD5": "eB5eJF1ptWaXm4bijSPyxw==",
    "Content-Type": "text/html",
    "x-oss-meta-author": "alice",
    "x-oss-meta-magic": "abracadabra",
    "x-oss-date": "Wed, 28 Dec 2022 10:27:41 GMT",
}


# Published in aliyun/alibabacloud-oss-python-sdk-v2 tests/unit/signer/test_v1.py
# (test_auth_header_1 .. _4). The string to sign uses x-oss-date, so `now` is irrelevant.
@pytest.mark.parametrize(
    ("method", "key", "query", "headers", "expected"),
    [
        pytest.param(
            "PUT", "nelson", {}, _V1_VECTOR_HEADERS, "OSS ak:kSHKmLxlyEAKtZPkJhG9bZb5k7M=", id="1"
        ),
        pytest.param(
            "PUT",
            "nelson",
            {"acl": None},
            _V1_VECTOR_HEADERS,
            "OSS ak:/afkugFbmWDQ967j1vr6zygBLQk=",
            id="2-acl",
        ),
        pytest.param(
            "GET",
            "",
            {"resourceGroup": None, "non-resousce": "null"},
            {"x-oss-date": "Wed, 28 Dec 2022 10:27:41 GMT"},
            "OSS ak:vkQmfuUDyi1uDi3bKt67oemssIs=",
            id="3-bucket",
        ),
        pytest.param(
            "GET",
            "",
            {"resourceGroup": "", "acl": ""},
            {"x-oss-date": "Wed, 28 Dec 2022 10:27:41 GMT"},
            "OSS ak:x3E5TgOvl/i7PN618s5mEvpJDYk=",
            id="4-bucket-two-subresources",
        ),
    ],
)
def test_oss_v1_published_vectors(
    method: str,
    key: str,
    query: dict[str, str | None],
    headers: dict[str, str],
    expected: str,
) -> None:
    signed = dict(headers)
    sign_oss_v1(method, "examplebucket", key, query, signed, Credentials("ak", "sk"), NOW)
    assert signed["Authorization"] == expected


# --------------------------------------------------------------------------- S3 SigV4

S3_ENDPOINTS = {
    # (scheme, host, path prefix): virtual-hosted on OSS's S3 API, and path style
    # on a local server with a non-default port.
    "virtual-hosted": ("https", f"{BUCKET}.s3.oss-{REGION}.aliyuncs.com", ""),
    "path-style": ("http", "127.0.0.1:8333", f"/{BUCKET}"),
}

# What sign_s3_v4 promises to sign out of the client's headers.
_S3_SIGNABLE = {"range", "if-match", "content-type", "content-md5"}


S3_CASES = {
    **CASES,
    # SigV4 "Trimall": outer whitespace dropped, inner runs collapsed to one space.
    "whitespace-in-values": Case(
        "GET",
        "k",
        {},
        {"Range": " bytes=0-9 ", "Content-Type": "text/plain;   charset=utf-8"},
    ),
}


@pytest.mark.parametrize("endpoint", _params(S3_ENDPOINTS))
@pytest.mark.parametrize("creds", CREDS_PARAMS)
@pytest.mark.parametrize("case", _params(S3_CASES))
def test_s3_v4_matches_botocore(
    case: Case,
    creds: Credentials,
    endpoint: tuple[str, str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    botocore_auth = pytest.importorskip("botocore.auth")
    awsrequest = pytest.importorskip("botocore.awsrequest")
    boto_creds = pytest.importorskip("botocore.credentials")
    boto_config = pytest.importorskip("botocore.config")
    monkeypatch.setattr(
        botocore_auth, "get_current_datetime", lambda *a, **k: NOW.replace(tzinfo=None)
    )

    scheme, host, prefix = endpoint
    path = f"{prefix}/{encode_key_path(case.key)}"  # the path the client sends
    ours = dict(case.headers)
    sign_s3_v4(case.method, host, path, case.query, ours, creds, "us-east-1", NOW)

    # botocore signs every header it is given, so give it only the ones we
    # claim to sign; it derives host from the URL itself.
    req = awsrequest.AWSRequest(
        method=case.method,
        url=f"{scheme}://{host}{path}",
        headers={k: v for k, v in case.headers.items() if k.lower() in _S3_SIGNABLE},
        params={k: v or "" for k, v in case.query.items()},
    )
    req.context["client_config"] = boto_config.Config(s3={"payload_signing_enabled": False})
    botocore_auth.S3SigV4Auth(
        boto_creds.Credentials(creds.access_key_id, creds.access_key_secret, creds.session_token),
        "s3",
        "us-east-1",
    ).add_auth(req)

    mine = _lower(ours)
    assert mine["authorization"] == req.headers["Authorization"]
    assert mine["x-amz-date"] == req.headers["X-Amz-Date"] == "20240305T070809Z"
    assert mine["x-amz-content-sha256"] == req.headers["X-Amz-Content-SHA256"]
    assert mine["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert mine.get("x-amz-security-token") == req.headers.get("X-Amz-Security-Token")
    assert mine["host"] == host


def test_s3_v4_never_signs_headers_http_libraries_rewrite() -> None:
    headers = {
        "Range": "bytes=0-9",
        "If-Match": ETAG,
        "Accept-Encoding": "identity",
        "User-Agent": "ossfs-resume/0.1",
        "Connection": "keep-alive",
    }
    sign_s3_v4("GET", "h.example", "/b/k", {}, headers, CREDS["token"], "us-east-1", NOW)
    m = re.search(r"SignedHeaders=([^,]+),", headers["Authorization"])
    assert m
    assert m.group(1).split(";") == [
        "host",
        "if-match",
        "range",
        "x-amz-content-sha256",
        "x-amz-date",
        "x-amz-security-token",
    ]


# --------------------------------------------------------------------------- helpers


def test_credentials_repr_hides_secret_and_token() -> None:
    creds = Credentials("AKID-visible", "s3cr3t-value", "t0ken-value")
    for text in (repr(creds), str(creds), f"{creds}"):
        assert "AKID-visible" in text
        assert "s3cr3t-value" not in text
        assert "t0ken-value" not in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        creds.access_key_secret = "x"  # type: ignore[misc]


@pytest.mark.parametrize("keep_slash", [True, False])
@pytest.mark.parametrize(
    "text",
    [AWKWARD_KEY, "日本語/ファイル名.bin", "a*b'c(d)e!f@g#h$i%j^k&l", "", "~-_./", "\x00\x7f é"],
)
def test_uri_encode_matches_botocore(text: str, keep_slash: bool) -> None:
    botocore_utils = pytest.importorskip("botocore.utils")
    safe = "-_.~/" if keep_slash else "-_.~"
    assert uri_encode(text, keep_slash=keep_slash) == botocore_utils.percent_encode(text, safe)
    assert unquote(uri_encode(text, keep_slash=keep_slash)) == text


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("a/../../x", "a/%2E%2E/%2E%2E/x"),
        ("./k", "%2E/k"),
        ("a/./b", "a/%2E/b"),
        ("..", "%2E%2E"),
        (".", "%2E"),
        ("a/b/..", "a/b/%2E%2E"),
        ("a//./b", "a//%2E/b"),
        ("...", "..."),
        (".a/b./..c", ".a/b./..c"),
        ("dir one/ü.txt", "dir%20one/%C3%BC.txt"),
        ("", ""),
    ],
)
def test_encode_key_path_escapes_only_dot_segments(key: str, path: str) -> None:
    assert encode_key_path(key) == path
    assert unquote(path) == key  # the store decodes it back to the key as typed


def test_uri_encode_examples() -> None:
    # RFC 3986 unreserved set only; a space is %20 (never '+'), UTF-8 bytes upper-case hex.
    assert uri_encode("a b+c=d/ü~", keep_slash=True) == "a%20b%2Bc%3Dd/%C3%BC~"
    assert uri_encode("a b+c=d/ü~", keep_slash=False) == "a%20b%2Bc%3Dd%2F%C3%BC~"


def test_canonical_query_sorted_and_encoded() -> None:
    query: dict[str, str | None] = {
        "prefix": "dir one/ü+x=",
        "max-keys": "1000",
        "list-type": "2",
        "delimiter": "/",
        "continuation-token": "CgR0ZXN0+/==",
        "encoding-type": "url",
        "uploads": None,
        "start-after": "",
    }
    out = canonical_query(query)
    pairs = [p.partition("=") for p in out.split("&")]
    keys = [k for k, _, _ in pairs]
    assert keys == sorted(keys)
    assert set(map(unquote, keys)) == set(query)
    assert re.fullmatch(r"[A-Za-z0-9\-_.~%&=]*", out), out
    for k, sep, v in pairs:
        original = query[unquote(k)]
        if original is None:
            assert sep == ""  # bare key
        else:
            assert sep == "="
            assert unquote(v) == original
    assert "prefix=dir%20one%2F%C3%BC%2Bx%3D" in out.split("&")


def test_canonical_query_matches_botocore_when_no_bare_keys() -> None:
    botocore_auth = pytest.importorskip("botocore.auth")
    query = {"z": "1", "a b": "c d", "+": "/", "é": "", "~x": "~y", "A": "B"}
    expected = botocore_auth.SigV4Auth(None, "s3", "us-east-1")._canonical_query_string_params(
        query
    )
    assert canonical_query(query) == expected


def test_canonical_query_empty() -> None:
    assert canonical_query({}) == ""


@pytest.fixture
def local_tz_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with a local time zone far from UTC, so treating naive as local would show."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset() needs Unix")
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("signer", ["v4", "v1", "s3"])
@pytest.mark.usefixtures("local_tz_not_utc")
def test_naive_now_is_utc_and_resigning_replaces_headers(signer: str) -> None:
    """A naive `now` means UTC; re-signing (a retry) replaces headers of any case."""
    creds = CREDS["token"]

    def sign(headers: dict[str, str], now: datetime) -> None:
        if signer == "v4":
            sign_oss_v4("GET", BUCKET, "k", {}, headers, creds, REGION, now)
        elif signer == "v1":
            sign_oss_v1("GET", BUCKET, "k", {}, headers, creds, now)
        else:
            sign_s3_v4("GET", "h", "/b/k", {}, headers, creds, "us-east-1", now)

    aware: dict[str, str] = {}
    sign(aware, NOW)
    naive: dict[str, str] = {}
    sign(naive, NOW.replace(tzinfo=None))
    assert naive == aware
    other_tz: dict[str, str] = {}
    sign(other_tz, NOW.astimezone(timezone(timedelta(hours=8))))
    assert other_tz == aware

    stale = {k.upper(): "stale" for k in aware}
    sign(stale, NOW)
    assert stale == aware  # every stale upper-case copy was replaced, none duplicated
