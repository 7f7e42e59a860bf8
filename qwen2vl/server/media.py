"""Where the server may fetch media from, and the fetching itself.

The server must not become a proxy into its user's network, so every media source in a request goes through
:class:`MediaPolicy` before the processor sees it:

* ``http://`` / ``https://``: the host is resolved and **every** address it resolves to is checked; loopback,
  private, link-local, multicast, reserved and other non-global addresses are refused unless
  ``allow_private``. The connection then goes to a checked address (no second lookup that DNS rebinding could
  answer differently), without proxies; redirects are followed by hand, each hop checked the same way. The
  download has a total time limit and a size limit. Images come back as bytes, videos as a temporary file.
* ``data:`` URLs: ``data:image/...;base64,`` images pass through; ``data:video/...;base64,`` videos are written
  to a temporary file. Their size is bounded by the request body limit.
* ``file://`` URLs: only when ``allowed_local_media_path`` is set, and only for files under it (symlinks
  resolved before the check).
* Anything else (a bare path, ftp://, ...) is refused.

Refusals raise :class:`~qwen2vl.errors.InvalidInputError` (the server answers 400).

After the policy, :meth:`MediaPolicy.check_image` reads each image's header and refuses one of more than
``max_image_pixels`` pixels before anything is decoded. :class:`ResolvedMedia` remembers how the user named each
local file it handed on (a temporary file, a ``file://`` URL's real path), so that error messages quote the
user's input, never the server's paths (:meth:`ResolvedMedia.redact`).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import functools
import http.client
import io
import ipaddress
import os
import socket
import ssl
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InvalidInputError
from ..media.common import check_image_header, short
from ..media.video import VIDEO_TEMP_SUFFIX

__all__ = ["MediaPolicy", "check_address", "ResolvedMedia", "describe_source"]

_REDIRECTS = (301, 302, 303, 307, 308)


@functools.lru_cache(maxsize=1)
def _dns_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="qwen2vl-dns")


def check_address(addr: str) -> str | None:
    """Why ``addr`` (an IP address) must not be fetched from, or None if it is a public address."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return check_address(str(mapped))
        if ip.teredo is not None:
            return "a Teredo address"
    for attr, what in (("is_loopback", "a loopback"), ("is_link_local", "a link-local"),
                       ("is_private", "a private"), ("is_multicast", "a multicast"),
                       ("is_unspecified", "an unspecified"), ("is_reserved", "a reserved")):
        if getattr(ip, attr):
            return what + " address"
    if not ip.is_global:
        return "a non-public address"
    return None


def describe_source(source: Any, kind: str) -> str:
    """How an error message names a media source the user gave: a URL (shortened), or what kind of value it is."""
    if isinstance(source, str):
        s = source.strip()
        return f"a data URL {kind}" if s[:5].lower() == "data:" else repr(short(s, 100))
    return f"a {type(source).__name__}"


@dataclass
class ResolvedMedia:
    """A request's media after the policy: sources rewritten to local values, plus temporary files to delete.
    ``labels``: local path -> how the user named it, for :meth:`redact`."""
    temp_files: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    def redact(self, message: str) -> str:
        """``message`` with every local path in ``labels`` (whole, or shortened as media errors quote it) replaced
        by the user's name for it."""
        for path, label in self.labels.items():
            for form in dict.fromkeys((path, short(path), short(path, 100))):
                message = message.replace(form, label)
        return message

    def cleanup(self) -> None:
        for path in self.temp_files:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.temp_files.clear()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self):
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, ip, timeout, context):
        super().__init__(host, port, timeout=timeout, context=context)
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass
class MediaPolicy:
    """``allowed_local_media_path``: directory whose files ``file://`` URLs may name (None: no file:// at all).
    ``allow_private``: also fetch from loopback / private / link-local addresses. ``timeout``: seconds for a
    whole download (redirects included). ``max_bytes``: the most bytes one download may have.
    ``resolver``: ``host -> [addresses]`` (tests replace it). ``max_image_pixels``: the most pixels an image
    may have, read from its header before it is decoded (:meth:`check_image`; None: no limit)."""

    allowed_local_media_path: str | None = None
    allow_private: bool = False
    timeout: float = 10.0
    max_bytes: int = 64 << 20
    max_redirects: int = 5
    resolver: Callable[[str, int], list[str]] | None = None
    max_image_pixels: int | None = 50_000_000

    def __post_init__(self):
        if self.allowed_local_media_path is not None:
            self.allowed_local_media_path = os.path.realpath(self.allowed_local_media_path)

    # ------------------------------------------------------------------ checks
    def _resolve(self, host: str, port: int) -> list[str]:
        if self.resolver is not None:
            return list(self.resolver(host, port))
        fut = _dns_pool().submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = fut.result(timeout=self.timeout)  # a lookup cannot be cancelled, but need not be waited for
        except concurrent.futures.TimeoutError:
            raise InvalidInputError(f"timed out resolving the media host {host!r}") from None
        except (socket.gaierror, UnicodeError, OSError) as e:
            raise InvalidInputError(f"cannot resolve the media host {host!r}: {e}") from None
        return list(dict.fromkeys(info[4][0] for info in infos))

    def check_url(self, url: str) -> tuple[urllib.parse.SplitResult, list[str]]:
        """Parse an http(s) URL and resolve its host; refuse it if the policy forbids any address."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise InvalidInputError(f"malformed media URL {short(url, 100)!r}: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise InvalidInputError(f"media URLs must be http(s), got {short(url, 100)!r}")
        host = parts.hostname
        if not host:
            raise InvalidInputError(f"the media URL {short(url, 100)!r} has no host")
        addrs = self._resolve(host, port)
        if not addrs:
            raise InvalidInputError(f"the media host {host!r} resolves to no address")
        if not self.allow_private:
            for a in addrs:
                why = check_address(a)
                if why is not None:
                    raise InvalidInputError(
                        f"refusing to fetch {short(url, 100)!r}: {host} resolves to {a}, {why} (start the server "
                        "with --allow-private-media-urls to allow it)")
        return parts, addrs

    def local_path(self, url: str) -> str:
        """The real path a file:// URL names, if it lies under the allowed directory."""
        if self.allowed_local_media_path is None:
            raise InvalidInputError("file:// media URLs are disabled (start the server with "
                                    "--allowed-local-media-path DIR to allow files under DIR)")
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInputError(f"file:// URLs must name a local file, got host {parts.netloc!r}")
        path = os.path.realpath(urllib.parse.unquote(parts.path))
        root = self.allowed_local_media_path
        if os.path.commonpath([root, path]) != root:
            raise InvalidInputError(f"{short(url, 100)!r} is outside the allowed media directory")
        if not os.path.isfile(path):
            raise InvalidInputError(f"media file not found: {short(url, 100)!r}")
        return path

    # ------------------------------------------------------------------ download
    def download(self, url: str) -> bytes:
        """The body of an http(s) URL, under the policy, the time limit and the size limit."""
        deadline = time.monotonic() + self.timeout
        ctx = None
        for _ in range(self.max_redirects + 1):
            parts, addrs = self.check_url(url)
            host = parts.hostname
            port = parts.port or (443 if parts.scheme == "https" else 80)
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InvalidInputError(f"timed out fetching {short(url, 100)!r}")
            conn = None
            last_error: Exception | None = None
            for ip in addrs:
                try:
                    if parts.scheme == "https":
                        ctx = ctx or ssl.create_default_context()
                        conn = _PinnedHTTPSConnection(host, port, ip, remaining, ctx)
                    else:
                        conn = _PinnedHTTPConnection(host, port, ip, remaining)
                    conn.request("GET", target, headers={"User-Agent": "qwen2vl", "Accept-Encoding": "identity",
                                                         "Host": parts.netloc.rsplit("@", 1)[-1]})
                    resp = conn.getresponse()
                    break
                except (OSError, http.client.HTTPException) as e:
                    last_error = e
                    if conn is not None:
                        conn.close()
                    conn = None
            if conn is None:
                raise InvalidInputError(f"cannot fetch {short(url, 100)!r}: {last_error}")
            try:
                if resp.status in _REDIRECTS:
                    loc = resp.getheader("Location")
                    if not loc:
                        raise InvalidInputError(f"redirect without a Location from {short(url, 100)!r}")
                    url = urllib.parse.urljoin(url, loc)
                    continue
                if resp.status != 200:
                    raise InvalidInputError(f"HTTP error {resp.status} ({resp.reason}) fetching {short(url, 100)!r}")
                return self._read_body(conn, resp, url, deadline)
            finally:
                conn.close()
        raise InvalidInputError(f"too many redirects fetching {short(url, 100)!r}")

    def _read_body(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, url: str,
                   deadline: float) -> bytes:
        """The body of a 200 response, within the size limit and the time left until ``deadline``."""
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise InvalidInputError(f"{short(url, 100)!r} is {int(length)} bytes, over the limit of "
                                    f"{self.max_bytes} bytes")
        chunks, total = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InvalidInputError(f"timed out fetching {short(url, 100)!r} (limit {self.timeout:g} s)")
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            try:
                chunk = resp.read(1 << 16)
            except (OSError, http.client.HTTPException) as e:
                raise InvalidInputError(f"error reading {short(url, 100)!r}: {e}") from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self.max_bytes:
                raise InvalidInputError(f"{short(url, 100)!r} is over the download limit of {self.max_bytes} "
                                        "bytes")
            chunks.append(chunk)

    # ------------------------------------------------------------------ sources
    def check_image(self, value: Any, what: str) -> None:
        """Read the header of a resolved image (bytes, a ``data:image`` URL or a local path; other values are the
        loaders' to check) and refuse it if it is no image or has more than ``max_image_pixels`` pixels."""
        if isinstance(value, str) and value.startswith("data:"):
            try:
                value = base64.b64decode(value.partition(",")[2])  # as the loader decodes it
            except (binascii.Error, ValueError) as e:
                raise InvalidInputError(f"corrupt base64 in {what}: {e}") from None
        if isinstance(value, (bytes, bytearray)):
            check_image_header(io.BytesIO(value), what, self.max_image_pixels)
        elif isinstance(value, str):
            check_image_header(value, what, self.max_image_pixels)

    def _temp_file(self, data: bytes, suffix: str, resolved: ResolvedMedia) -> str:
        fd, path = tempfile.mkstemp(prefix="qwen2vl-media-", suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        resolved.temp_files.append(path)
        return path

    def resolve(self, source: Any, kind: str, resolved: ResolvedMedia) -> Any:
        """A request's media source (``kind`` "image" or "video") as something the processor can load without
        touching the network: bytes, a local path, a data URL, or a list of those (frame-list videos)."""
        if kind == "video" and isinstance(source, list):
            if not source:
                raise InvalidInputError("a frame-list video needs at least one frame")
            return [self.resolve(frame, "image", resolved) for frame in source]
        if not isinstance(source, str):
            raise InvalidInputError(f"a {kind} source must be a URL string, got {type(source).__name__}")
        s = source.strip()
        low = s[:16].lower()
        if low.startswith(("http://", "https://")):
            data = self.download(s)
            if kind == "image":
                return data
            return self._temp_file(data, VIDEO_TEMP_SUFFIX, resolved)  # never the client's suffix
        if low.startswith("data:"):
            header, sep, payload = s.partition(",")
            mime = header[5:].split(";", 1)[0].strip().lower()
            if not sep or ";base64" not in header.lower():
                raise InvalidInputError(f"{kind} data URLs must be base64 encoded ('data:{kind}/...;base64,...')")
            if kind == "image":
                if not mime.startswith("image/"):
                    raise InvalidInputError(f"an image data URL must be data:image/..., got data:{mime}")
                return "data:image/" + mime[6:] + ";base64," + payload
            if not mime.startswith("video/"):
                raise InvalidInputError(f"a video data URL must be data:video/..., got data:{mime}")
            try:
                data = base64.b64decode(payload, validate=False)
            except (binascii.Error, ValueError) as e:
                raise InvalidInputError(f"corrupt base64 in the video data URL: {e}") from None
            return self._temp_file(data, VIDEO_TEMP_SUFFIX, resolved)
        if low.startswith("file:"):
            return self.local_path(s)
        raise InvalidInputError(f"unsupported {kind} source {short(s, 100)!r}: use an http(s):// URL, a data: URL"
                                + (" or a file:// URL" if self.allowed_local_media_path else ""))
