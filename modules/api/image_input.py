"""Images in API requests: raw base64, data URIs, and http(s) URLs (only when allowed, never to local addresses).

Fetching a URL on a client's behalf is a way into the server's own network (SSRF): it is off unless the
`api_enable_requests` setting is on, every address the host name resolves to must be public, the
connection goes to the address that was checked (so a second DNS answer cannot swap in a private one),
redirects are not followed and the download is capped.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

from fastapi import HTTPException

from modules.core import outputs

MAX_DOWNLOAD_BYTES = 50 * 2**20
DOWNLOAD_TIMEOUT_S = 15


class ImageInputError(ValueError):
    """An image field that cannot be turned into an image (the client's mistake)."""


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def _checked_address(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageInputError(f"cannot resolve the image URL's host {host!r}: {e}") from None
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        raise ImageInputError(f"the image URL's host {host!r} has no address")
    for address in addresses:
        if not is_public_address(address):
            raise ImageInputError(f"image URLs may not point at loopback or private addresses ({host} -> {address})")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to a checked address while sending the URL's host name."""

    def __init__(self, host, port, address, **kw):
        super().__init__(host, port, **kw)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, address, **kw):
        super().__init__(host, port, context=ssl.create_default_context(), **kw)
        self._address = address

    def connect(self):
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def fetch_url(url: str) -> bytes:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageInputError(f"image URL must be http(s)://host/..., got {url[:100]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _checked_address(parts.hostname, port)
    cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    conn = cls(parts.hostname, port, address, timeout=DOWNLOAD_TIMEOUT_S)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    try:
        conn.request("GET", target, headers={"User-Agent": "sd-studio", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise ImageInputError(f"image URL answered HTTP {resp.status} (redirects are not followed)")
        data = resp.read(MAX_DOWNLOAD_BYTES + 1)
    except (OSError, http.client.HTTPException) as e:
        raise ImageInputError(f"could not download the image URL: {e}") from None
    finally:
        conn.close()
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageInputError(f"image URL is larger than {MAX_DOWNLOAD_BYTES // 2**20} MB")
    return data


def decode_image(text: str, *, allow_urls: bool):
    """A PIL image from raw base64, a data URI or (when allowed) an http(s) URL; ImageInputError otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ImageInputError("is empty: send a base64-encoded image or a data: URI")
    stripped = text.strip()
    scheme, sep, _ = stripped[:16].partition("://")
    if sep and scheme.isalpha():  # a URL (base64 never holds ':')
        if not allow_urls:
            raise ImageInputError("is a URL, but image URLs are disabled on this server "
                                  "(setting api_enable_requests)")
        import base64
        return outputs.decode_image_base64(base64.b64encode(fetch_url(stripped)).decode("ascii"))
    try:
        return outputs.decode_image_base64(stripped)
    except outputs.InvalidImageError as e:
        raise ImageInputError(str(e)) from None


def decode_image_or_422(text: str, field: str, *, allow_urls: bool = False):
    """decode_image for a route: a bad image is the client's mistake, answered 422 naming the field."""
    try:
        return decode_image(text, allow_urls=allow_urls)
    except (ImageInputError, outputs.InvalidImageError) as e:
        raise HTTPException(422, f"{field}: {e}") from None
