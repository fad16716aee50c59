"""URLs and paths: what a location is, the fsspec options to open it with, reading it from
anywhere with timeouts, and the one retry rule (``Retry``, ``is_transient``) of every read and
write.

Credentials come the standard way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
instance roles; AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for S3-compatible services) or from
``storage_options``. They are never logged, printed or written anywhere: only URLs are.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, TypeVar

from ..errors import ShardFormatError, ShardIntegrityError, ShardkitError

T = TypeVar("T")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_S3_PROTOCOLS = ("s3", "s3a")
# botocore's names for missing credentials (matched by name: botocore is optional).
_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError")


def is_url(location: str | os.PathLike) -> bool:
    """True for object-storage URLs (``s3://bucket/prefix``, chained ``simplecache::s3://...``); ``file://`` is local."""
    text = str(location)
    return (bool(_URL.match(text)) or "::" in text) and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    text = str(location)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options`` JSON (e.g. '{"client_kwargs": {"region_name": "eu-west-1"}}') -> dict."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardkitError(f"--storage-options is not valid JSON ({exc.msg}); pass an object like "
                            f"'{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'") from None
    if not isinstance(options, dict):
        raise ShardkitError("--storage-options must be a JSON object")
    return options


def storage_options_for(url: str | os.PathLike, endpoint_url: str | None = None,
                        storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options to open ``url`` with: ``storage_options`` plus, for s3:// URLs, the endpoint.

    Local paths need none. Without an endpoint, s3fs (botocore) reads AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL and the credentials from the environment or AWS_PROFILE.
    """
    if not is_url(url):
        return {}
    options = dict(storage_options or {})
    protocol = str(url).split("://", 1)[0].rsplit("::", 1)[-1].lower()
    if endpoint_url and protocol in _S3_PROTOCOLS:
        options.setdefault("endpoint_url", endpoint_url)
    return options


def _url_to_fs(url: str, options: dict[str, Any]):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise ShardkitError(f"cannot open {url}: {exc}; install the storage extra (pip install 'shardkit[s3]')") from None
    except (ValueError, TypeError) as exc:
        raise ShardkitError(f"cannot open {url}: {exc}; check the URL and the storage options") from None


def storage_error(url: str, exc: BaseException) -> ShardkitError:
    """One line naming the URL and what went wrong; never the credentials (they are not in exceptions)."""
    name = type(exc).__name__
    if name in _CREDENTIAL_ERRORS:
        return ShardkitError(f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(exc, PermissionError):
        return ShardkitError(f"access to {url} was denied ({exc}); check the credentials and the bucket's policy")
    return ShardkitError(f"cannot reach {url} ({name}: {exc}); check the endpoint (--endpoint-url or "
                         f"AWS_ENDPOINT_URL) and the network, then run the same command again")


# ---- reading from anywhere, and the one retry rule ---------------------------------------

@dataclass(frozen=True)
class Retry:
    """The retry rule of every read and write: ``retries`` more attempts after a transient
    failure, waiting ``backoff * 2**(n-1)`` seconds times a random jitter in [0.5, 1) before
    retry n (ranks that failed together do not retry together), or the fixed ``delays``."""

    retries: int = 3
    backoff: float = 1.0
    delays: tuple[float, ...] | None = None

    @property
    def attempts(self) -> int:
        return (len(self.delays) if self.delays is not None else self.retries) + 1

    def delay(self, attempt: int) -> float:
        if self.delays is not None:
            return self.delays[attempt - 1]
        return self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)

    def run(self, action: Callable[[], T], transient: Callable[[BaseException], bool],
            on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
        attempt = 0
        while True:
            try:
                return action()
            except Exception as exc:
                if attempt + 1 >= self.attempts or not transient(exc):
                    raise
                attempt += 1
                delay = self.delay(attempt)
                if on_retry is not None:
                    on_retry(attempt, exc, delay)
                time.sleep(delay)


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)  # botocore.exceptions.ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


# Names of the network errors of optional libraries (aiohttp, botocore), matched by name.
_TRANSIENT_NAMES = {"ClientConnectionError", "ClientConnectorError", "ClientOSError", "ServerDisconnectedError",
                    "ClientPayloadError", "ServerTimeoutError", "FSTimeoutError", "EndpointConnectionError",
                    "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError"}


def is_transient(exc: BaseException, url: str = "") -> bool:
    """Whether trying again may succeed. Transient: connection refused or reset, timeouts, HTTP
    5xx and 429, a remote stream cut short, a download whose checksum is wrong. Permanent: HTTP
    404/403 and other 4xx, missing files and refused access, malformed content, and every error
    of a local file."""
    if isinstance(exc, (ShardFormatError, ShardkitError)):
        return False
    if isinstance(exc, ShardIntegrityError):
        return True
    if url and not is_url(url):
        return False
    for link in _chain(exc):
        status = _http_status(link)
        if status is not None:
            return status == 429 or status >= 500
        if isinstance(link, (ConnectionError, TimeoutError)) or type(link).__name__ in _TRANSIENT_NAMES:
            return True
        if any(type(base).__name__ == "ClientConnectionError" for base in type(link).__mro__):
            return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(exc, (OSError, EOFError)) or type(exc).__name__ in ("ClientError", "BotoCoreError")


def with_timeouts(url: str, options: dict[str, Any] | None, timeout: float | None = 60.0) -> dict[str, Any]:
    """``options`` for ``url`` with connect/read timeouts added where the user set none."""
    if not is_url(url):
        return dict(options or {})
    import fsspec

    return _with_timeouts(fsspec.utils.get_protocol(url), dict(options or {}), timeout)


def _with_timeouts(protocol: str, options: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Storage options with connect/read timeouts added where the user set none: a stalled server
    then raises (and is retried) instead of hanging a training job."""
    if timeout is None:
        return options
    if protocol in ("http", "https"):
        import aiohttp

        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout))
        options["client_kwargs"] = client_kwargs
    elif protocol in _S3_PROTOCOLS:
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("connect_timeout", timeout)
        config_kwargs.setdefault("read_timeout", timeout)
        options["config_kwargs"] = config_kwargs
    return options


def _remote(url: str, options: dict[str, Any] | None, timeout: float | None):
    import fsspec

    protocol = fsspec.utils.get_protocol(url)
    fs, path = _url_to_fs(url, _with_timeouts(protocol, dict(options or {}), timeout))
    return fs, path, protocol


def open_read(url: str, options: dict[str, Any] | None = None, timeout: float | None = 60.0) -> BinaryIO:
    """A local path or any fsspec URL opened for reading front to back."""
    if not is_url(url):
        return open(local_path(url), "rb")
    fs, path, protocol = _remote(url, options, timeout)
    if protocol in ("http", "https"):
        # One streaming GET (many servers ignore Range requests). A size given up front skips
        # fsspec's HEAD-then-GET size probe: a stall there would cost a second timeout, and a
        # refused connection there reads as "not found".
        return fs.open(path, "rb", block_size=0, size=1)
    return fs.open(path, "rb")


def read_url_bytes(url: str, options: dict[str, Any] | None = None, timeout: float | None = 60.0) -> bytes:
    """A whole (small) file from a local path or any fsspec URL."""
    if not is_url(url):
        return local_path(url).read_bytes()
    fs, path, _ = _remote(url, options, timeout)
    return fs.cat_file(path)


def join_url(base: str, relative: str) -> str:
    if not is_url(base):
        return str(local_path(base) / relative)
    return base.rstrip("/") + "/" + relative
