"""Request signing for OSS (V4 and legacy V1) and S3 (SigV4).

Pure functions: each takes the parts of a request and adds the auth headers to
a plain ``dict`` in place, so the HTTP client stays in charge of sending and
the signatures can be checked against the official SDKs without any network.

Query strings: :func:`canonical_query` builds the one string the client puts
in the URL. Each signer then canonicalises the *same* encoded pairs the way
its server does when it verifies, so what is signed always matches what is
sent:

* ``None`` is sent as a bare ``key``; ``""`` is sent as ``key=``.
* OSS V4 signs an empty value as a bare ``key`` (as the OSS server and SDKs do),
* S3 SigV4 signs it as ``key=`` (as AWS specifies),
* OSS V1 signs only whitelisted sub-resources, raw and unencoded, bare when empty.

Times: ``now`` should be timezone-aware; a naive value is taken to be UTC
(the result of ``datetime.utcnow()``), never local time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from urllib.parse import quote

__all__ = [
    "Credentials",
    "canonical_query",
    "encode_key_path",
    "sign_oss_v1",
    "sign_oss_v4",
    "sign_s3_v4",
    "uri_encode",
]

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

# Sub-resources OSS V1 puts in the canonical resource: the union of the lists
# in oss2 (aliyun-oss-python-sdk) and alibabacloud-oss-python-sdk-v2. Any other
# query parameter (prefix, max-keys, list-type, ...) is not signed in V1.
_V1_SUBRESOURCES = frozenset(
    {
        "accessPoint",
        "accessPointPolicy",
        "acl",
        "append",
        "asyncFetch",
        "bucketArchiveDirectRead",
        "bucketInfo",
        "callback",
        "callback-var",
        "cloudboxes",
        "cname",
        "comp",
        "continuation-token",
        "cors",
        "delete",
        "encryption",
        "endTime",
        "group",
        "httpsConfig",
        "inventory",
        "inventoryId",
        "lifecycle",
        "link",
        "live",
        "location",
        "logging",
        "metaQuery",
        "objectInfo",
        "objectMeta",
        "partNumber",
        "policy",
        "position",
        "publicAccessBlock",
        "qos",
        "qosInfo",
        "qosRequester",
        "redundancyTransition",
        "referer",
        "regionList",
        "replication",
        "replicationLocation",
        "replicationProgress",
        "requestPayment",
        "requesterQosInfo",
        "resourceGroup",
        "resourcePool",
        "resourcePoolBuckets",
        "resourcePoolInfo",
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "response-content-language",
        "response-content-type",
        "response-expires",
        "restore",
        "security-token",
        "sequential",
        "startTime",
        "stat",
        "status",
        "style",
        "styleName",
        "symlink",
        "tagging",
        "transferAcceleration",
        "uploadId",
        "uploads",
        "versionId",
        "versioning",
        "versions",
        "vod",
        "website",
        "worm",
        "wormExtend",
        "wormId",
        "x-oss-ac-forward-allow",
        "x-oss-ac-source-ip",
        "x-oss-ac-subnet-mask",
        "x-oss-ac-vpc-id",
        "x-oss-access-point-name",
        "x-oss-async-process",
        "x-oss-process",
        "x-oss-redundancy-transition-taskid",
        "x-oss-request-payer",
        "x-oss-target-redundancy-type",
        "x-oss-traffic-limit",
        "x-oss-write-get-object-response",
    }
)

# Headers S3 SigV4 signs besides x-amz-*. Deliberately short: a header an HTTP
# library may rewrite (accept-encoding, user-agent, connection) must never be
# signed, or the server's recomputed signature would differ.
_S3_SIGNED_HEADERS = frozenset({"host", "range", "if-match", "content-type", "content-md5"})


@dataclass(frozen=True)
class Credentials:
    """An access key pair, plus an STS token for temporary credentials.

    The secret and the token are left out of ``repr`` so a logged or
    traced ``Credentials`` never leaks them.
    """

    access_key_id: str
    access_key_secret: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def uri_encode(s: str, *, keep_slash: bool) -> str:
    """Percent-encode every byte of UTF-8 except A-Z a-z 0-9 - _ . ~ (and '/' when keep_slash).

    This is the RFC 3986 encoding both OSS V4 and AWS SigV4 specify; it is
    stricter than a browser's (spaces become %20, never '+'), so the server
    re-encoding what it received arrives at the same string.
    """
    # quote() always keeps A-Z a-z 0-9 and "_.-~" (Python >= 3.7).
    return quote(s, safe="/" if keep_slash else "", encoding="utf-8", errors="strict")


def encode_key_path(key: str) -> str:
    """The key as a URL path: :func:`uri_encode` with '/' kept, and every '.' or '..'
    segment sent as ``%2E`` / ``%2E%2E``.

    HTTP libraries (and proxies) resolve literal dot segments, so ``a/../../x``
    would reach the store as ``/x``: another object, or another bucket's.
    Escaped, they reach the store as part of the key, which names exactly
    what the user typed. Servers decode ``%2E`` to ``.``; keys with dots
    elsewhere (``a.b``, ``...``) are not dot segments and stay as they are.
    """
    segments = uri_encode(key, keep_slash=True).split("/")
    return "/".join("%2E" * len(s) if s in (".", "..") else s for s in segments)


def _encoded_pairs(query: Mapping[str, str | None]) -> list[tuple[str, str | None]]:
    """URI-encoded (key, value) pairs sorted by encoded key, as every signer needs."""
    pairs = [
        (uri_encode(k, keep_slash=False), None if v is None else uri_encode(v, keep_slash=False))
        for k, v in query.items()
    ]
    pairs.sort(key=lambda kv: (kv[0], kv[1] or ""))
    return pairs


def canonical_query(query: Mapping[str, str | None]) -> str:
    """Sorted, URI-encoded query string, exactly as it must be both signed and sent.

    ``None`` values give a bare ``key`` (``?uploads``), ``""`` gives ``key=``
    (``?prefix=``). Both servers treat the two forms alike, and each signer
    canonicalises empty values its own way (bare for OSS V4, ``key=`` for
    S3), so the client can put this string in the URL unchanged.
    """
    return "&".join(k if v is None else f"{k}={v}" for k, v in _encoded_pairs(query))


def _utc(now: datetime) -> datetime:
    """``now`` in UTC; a naive value is assumed to be UTC already."""
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


def _set_header(headers: dict[str, str], name: str, value: str) -> None:
    """Set a header, dropping any spelling of it in another case first.

    Without this a re-signed request (a retry) could carry both ``Date`` and
    ``date``, and the server would see two values.
    """
    lname = name.lower()
    for existing in [k for k in headers if k.lower() == lname]:
        del headers[existing]
    headers[name] = value


def _get_header(headers: Mapping[str, str], name: str) -> str:
    lname = name.lower()
    for k, v in headers.items():
        if k.lower() == lname:
            return v.strip()
    return ""


def _v4_signature(
    algorithm: str,
    key_prefix: str,
    service: str,
    terminator: str,
    secret: str,
    timestamp: str,
    region: str,
    canonical_request: str,
) -> tuple[str, str]:
    """(scope, hex signature): the derivation OSS V4 and AWS SigV4 share, names aside."""
    date = timestamp[:8]
    scope = f"{date}/{region}/{service}/{terminator}"
    string_to_sign = "\n".join([algorithm, timestamp, scope, _sha256_hex(canonical_request)])
    signing_key = (key_prefix + secret).encode("utf-8")
    for part in (date, region, service, terminator):
        signing_key = _hmac_sha256(signing_key, part)
    signature = hmac.new(signing_key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return scope, signature


def _hmac_sha256(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def _sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def sign_oss_v4(
    method: str,
    bucket: str,
    key: str,
    query: Mapping[str, str | None],
    headers: dict[str, str],
    creds: Credentials,
    region: str,
    now: datetime,
) -> None:
    """Sign an OSS request with OSS4-HMAC-SHA256, adding the headers in place.

    Adds ``x-oss-date``, ``x-oss-content-sha256: UNSIGNED-PAYLOAD``,
    ``x-oss-security-token`` (when there is a token), ``Date`` (unsigned in V4,
    but the official SDKs always send it) and ``Authorization``.

    The canonical URI is ``/bucket/key`` (``/bucket/`` when ``key == ""``)
    whatever the addressing style: OSS V4 always signs the bucket in the path.
    It is built from the key itself, as the server rebuilds it from the key it
    decoded, so a dot segment sent as ``%2E`` is signed as ``.``.
    Signed headers are the V4 defaults: every ``x-oss-*`` plus
    ``content-type`` and ``content-md5``; no AdditionalHeaders, so headers
    like ``Range`` or ``Accept-Encoding`` may be rewritten by the HTTP layer
    without breaking the signature. ``region`` is the bare region id, such as
    ``cn-hangzhou`` (not ``oss-cn-hangzhou``).
    """
    t = _utc(now)
    timestamp = t.strftime("%Y%m%dT%H%M%SZ")

    _set_header(headers, "x-oss-date", timestamp)
    _set_header(headers, "Date", format_datetime(t, usegmt=True))
    _set_header(headers, "x-oss-content-sha256", UNSIGNED_PAYLOAD)
    if creds.session_token:
        _set_header(headers, "x-oss-security-token", creds.session_token)

    canonical_uri = uri_encode(f"/{bucket}/{key}", keep_slash=True)
    # OSS canonicalises an empty value as a bare key, whether sent as k or k=.
    query_str = "&".join(f"{k}={v}" if v else k for k, v in _encoded_pairs(query))

    signed: dict[str, str] = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname.startswith("x-oss-") or lname in ("content-type", "content-md5"):
            signed[lname] = value.strip()
    canonical_headers = "".join(f"{k}:{signed[k]}\n" for k in sorted(signed))

    canonical_request = "\n".join(
        [
            method.upper(),
            canonical_uri,
            query_str,
            canonical_headers,
            "",  # AdditionalHeaders: none
            UNSIGNED_PAYLOAD,
        ]
    )
    scope, signature = _v4_signature(
        "OSS4-HMAC-SHA256",
        "aliyun_v4",
        "oss",
        "aliyun_v4_request",
        creds.access_key_secret,
        timestamp,
        region,
        canonical_request,
    )

    _set_header(
        headers,
        "Authorization",
        f"OSS4-HMAC-SHA256 Credential={creds.access_key_id}/{scope},Signature={signature}",
    )


def sign_oss_v1(
    method: str,
    bucket: str,
    key: str,
    query: Mapping[str, str | None],
    headers: dict[str, str],
    creds: Credentials,
    now: datetime,
) -> None:
    """Sign an OSS request with the legacy V1 scheme (``OSS ak:signature``) in place.

    For endpoints that do not accept V4 yet. Adds ``Date``,
    ``x-oss-security-token`` (when there is a token) and ``Authorization``.
    The string to sign uses an ``x-oss-date`` header instead of ``Date`` when
    the caller supplied one, as the server does. The resource is
    ``/bucket/key`` with the raw (unencoded) key, dot segments included, plus the whitelisted
    sub-resources from ``query``, raw as well.
    """
    _set_header(headers, "Date", format_datetime(_utc(now), usegmt=True))
    if creds.session_token:
        _set_header(headers, "x-oss-security-token", creds.session_token)

    oss_headers: dict[str, str] = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname.startswith("x-oss-"):
            oss_headers[lname] = value.strip()
    canonical_headers = "".join(f"{k}:{oss_headers[k]}\n" for k in sorted(oss_headers))

    subresources = sorted(
        ((k, v) for k, v in query.items() if k in _V1_SUBRESOURCES), key=lambda kv: kv[0]
    )
    resource = f"/{bucket}/{key}"
    if subresources:
        resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in subresources)

    date = _get_header(headers, "x-oss-date") or _get_header(headers, "Date")
    string_to_sign = "\n".join(
        [
            method.upper(),
            _get_header(headers, "Content-MD5"),
            _get_header(headers, "Content-Type"),
            date,
            canonical_headers + resource,
        ]
    )
    digest = hmac.new(
        creds.access_key_secret.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha1
    ).digest()
    signature = base64.b64encode(digest).decode("ascii")
    _set_header(headers, "Authorization", f"OSS {creds.access_key_id}:{signature}")


def sign_s3_v4(
    method: str,
    host: str,
    path: str,
    query: Mapping[str, str | None],
    headers: dict[str, str],
    creds: Credentials,
    region: str,
    now: datetime,
) -> None:
    """Sign an S3 request with AWS SigV4 (service ``s3``) in place.

    Adds ``Host``, ``x-amz-date``, ``x-amz-content-sha256: UNSIGNED-PAYLOAD``,
    ``x-amz-security-token`` (when there is a token) and ``Authorization``.
    ``path`` is the request path exactly as sent, already URI-encoded
    (``/bucket/a%20b``, dot segments as ``%2E``: see :func:`encode_key_path`);
    S3 does not normalise or double-encode it. ``host``
    is the Host header value, without a default port.

    Signed headers: host, every x-amz-*, and range / if-match / content-type /
    content-md5 when present. Nothing an HTTP library might rewrite
    (accept-encoding, user-agent) is signed.
    """
    t = _utc(now)
    timestamp = t.strftime("%Y%m%dT%H%M%SZ")

    _set_header(headers, "Host", host)
    _set_header(headers, "x-amz-date", timestamp)
    _set_header(headers, "x-amz-content-sha256", UNSIGNED_PAYLOAD)
    if creds.session_token:
        _set_header(headers, "x-amz-security-token", creds.session_token)

    # AWS canonicalises an empty value as "key=", whether sent as k or k=.
    query_str = "&".join(f"{k}={v or ''}" for k, v in _encoded_pairs(query))

    signed: dict[str, str] = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname.startswith("x-amz-") or lname in _S3_SIGNED_HEADERS:
            # SigV4 Trimall: strip, and collapse inner runs of spaces.
            signed[lname] = " ".join(value.split())
    signed_names = ";".join(sorted(signed))
    canonical_headers = "".join(f"{k}:{signed[k]}\n" for k in sorted(signed))

    canonical_request = "\n".join(
        [
            method.upper(),
            path or "/",
            query_str,
            canonical_headers,
            signed_names,
            UNSIGNED_PAYLOAD,
        ]
    )
    scope, signature = _v4_signature(
        "AWS4-HMAC-SHA256",
        "AWS4",
        "s3",
        "aws4_request",
        creds.access_key_secret,
        timestamp,
        region,
        canonical_request,
    )

    _set_header(
        headers,
        "Authorization",
        f"AWS4-HMAC-SHA256 Credential={creds.access_key_id}/{scope}, "
        f"SignedHeaders={signed_names}, Signature={signature}",
    )
