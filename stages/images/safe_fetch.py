"""Image downloads that contain the hostile web: private networks, slow or endless bodies,
redirect loops, decompression bombs, bodies that are not images.

img2dataset fetches with ``urllib.request.urlopen``: its timeout bounds each socket read,
not the whole response (a server trickling a byte a second holds a thread for ever), it
follows redirects anywhere, reads bodies of any size and connects to any address, the
cloud metadata service included. :func:`fetch_image` replaces that fetch; every refusal
is returned as a stable reason code, which img2dataset records as the sample's
``error_message`` and counts in its stats. How it spares the hosts it asks (a pace per
host, backoff on 429/503) is :mod:`stages.images.politeness`.

Two module attributes are where the guard meets the machine, and where tests meet the
guard: :data:`resolve` (host names to addresses) and :data:`tls_context` (which
certificates HTTPS trusts).
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import urljoin, urlsplit

from stages.images import politeness
from stages.settings import setting

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
DEFAULT_PORTS = {"http": 80, "https": 443}
CHUNK = 64 * 1024
REDIRECTS = (301, 302, 303, 307, 308)


class FetchRefused(Exception):
    """A download stopped by policy or by the server; ``str()`` is the reason code."""


@dataclass(frozen=True)
class FetchPolicy:
    """Limits on one image download. Every field is a DAG param (see docs/safety.md)."""

    allowed_networks: tuple[str, ...] = setting(
        [], env="LAION_ALLOWED_NETWORKS", type="array", items={"type": "string", "minLength": 1},
        description="CIDRs that downloads may reach although private (loopback, LAN...). Empty: public addresses only.",
    )  # fmt: skip
    max_download_seconds: float = setting(
        30.0, type="number", exclusiveMinimum=0, maximum=3600,
        description="Wall-clock limit per image, redirects and waits included.",
    )  # fmt: skip
    max_image_bytes: int = setting(32 * 1024 * 1024, type="integer", minimum=1024, description="Largest body accepted.")
    max_redirects: int = setting(5, type="integer", minimum=0, maximum=30)
    max_image_pixels: int = setting(
        100_000_000, type="integer", minimum=1, description="Declared pixel count above which an image is a decompression bomb."
    )
    max_retry_after_seconds: float = setting(
        10.0, type="number", minimum=0, maximum=600,
        description="Longest wait before asking again after a 429/503: a longer Retry-After is not honoured; "
        "without Retry-After, backoff waits grow up to it. 0: no backoff.",
    )  # fmt: skip
    per_host_connections: int = setting(
        0, type="integer", minimum=0, description="Concurrent connections per host and worker process; 0: no cap."
    )
    max_requests_per_second_per_host: float = setting(
        10.0, env="LAION_MAX_REQUESTS_PER_SECOND_PER_HOST", type="number", minimum=0, maximum=100_000,
        description="Requests per second to one host from a download task, all its workers and threads together "
        "(concurrent tasks each have their own); 0: no limit. 10: about what one browser opening an image gallery "
        "asks of a host, which a large host does not notice and a small one is not flooded by.",
    )  # fmt: skip
    networks: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The param gives a list: a tuple keeps the frozen policy immutable and hashable.
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        object.__setattr__(self, "networks", parse_networks(self.allowed_networks))


def parse_networks(cidrs: Iterable[str]) -> tuple:
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"allowed_networks: {cidr!r} is not an IP network in CIDR form (e.g. 127.0.0.0/8)") from None
    return tuple(networks)


def refusal_reason(address: str, allowed: tuple = ()) -> str | None:
    """Why connecting to ``address`` is refused, or None when it is a public address.

    Loopback, private, link-local (169.254.169.254 included), carrier-grade NAT, multicast,
    reserved and unspecified ranges are refused, in IPv4 and IPv6, IPv4-mapped IPv6 judged
    as the IPv4 address it carries; ``allowed`` networks are opened on purpose.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in allowed if network.version == ip.version):
        return None
    for label, test in (
        ("loopback", ip.is_loopback),
        ("link_local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("not_global", not ip.is_global),
    ):
        if test:
            return label
    return None


def system_resolve(host: str, port: int) -> list[tuple]:
    """The system resolver: ``socket.getaddrinfo`` for a TCP connection."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


# What the guard asks for a host's addresses, with getaddrinfo's contract: a list of
# (family, type, proto, canonname, sockaddr), socket.gaierror when the name does not
# resolve. Tests point it at a DNS server of their own; nothing else should change it.
resolve: Callable[[str, int], list[tuple]] = system_resolve


@functools.cache
def system_tls_context() -> ssl.SSLContext:
    """Certificates and host names checked against the system's trust store; one context
    per process (http.client would load the store again for every connection)."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


# The context HTTPS downloads are verified with; tests hand it a test CA.
tls_context: Callable[[], ssl.SSLContext] = system_tls_context


def guarded_connect(host: str, port: int, timeout: float, policy: FetchPolicy) -> socket.socket:
    """Resolve ``host`` once and connect to the first permitted address.

    The check runs on the addresses actually connected to, after resolution, and the
    connection goes to the address checked (never to a second lookup), so a name that
    resolves to a private address (DNS rebinding included) is refused.
    """
    try:
        infos = resolve(host, port)
    except socket.gaierror:
        raise FetchRefused("dns_error") from None
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        if refusal_reason(sockaddr[0], policy.networks):
            continue
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    if last_error is None:
        raise FetchRefused("refused_private_address")
    raise FetchRefused("connection_timeout" if isinstance(last_error, socket.timeout) else "connection_error")


class _GuardedHTTP(http.client.HTTPConnection):
    policy: FetchPolicy

    def connect(self) -> None:
        self.sock = guarded_connect(self.host, self.port, self.timeout, self.policy)


class _GuardedHTTPS(http.client.HTTPSConnection):
    policy: FetchPolicy

    def connect(self) -> None:
        sock = guarded_connect(self.host, self.port, self.timeout, self.policy)
        try:
            # wrap_socket takes the socket over, and closes it when the handshake fails.
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError:
            raise FetchRefused("certificate_error") from None
        except ssl.SSLEOFError:  # a hang-up during the handshake: as transient as one before it
            raise FetchRefused("connection_error") from None
        except ssl.SSLError:  # no common protocol version, an alert, no TLS on that port
            raise FetchRefused("tls_error") from None


def user_agent(token: str | None) -> str:
    """img2dataset's User-Agent: its token, when set, names the crawler to X-Robots-Tag."""
    if not token:
        return USER_AGENT
    return f"{USER_AGENT} (compatible; {token}; +https://github.com/rom1504/img2dataset)"


def is_disallowed(headers: http.client.HTTPMessage, directives: set[str], user_agent_token: str | None) -> bool:
    """X-Robots-Tag handling as img2dataset's own (``noai``, ``noimageai`` ... by default)."""
    for value in headers.get_all("X-Robots-Tag") or []:
        token, rest = value.split(":", 1) if ":" in value else (None, value)
        token = token.strip().lower() if token else None
        if (token is None or token == user_agent_token) and any(d.strip().lower() in directives for d in rest.split(",")):
            return True
    return False


def fetch_image(
    url: str,
    policy: FetchPolicy,
    *,
    timeout: float = 10.0,
    disallowed_directives: set[str] | None = None,
    user_agent_token: str | None = None,
) -> bytes:
    """The body of ``url``, checked to look like an image; raises :class:`FetchRefused`."""
    deadline = time.monotonic() + policy.max_download_seconds
    first_request = True
    redirects = 0
    busy = politeness.BusyAnswers(policy.max_retry_after_seconds)
    while True:
        parts = urlsplit(url)
        port = _port(parts)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchRefused("download_time_limit")
        slot = politeness.connection_slots(parts.hostname, policy.per_host_connections)
        # Waiting for a slot is part of the image's time, not a way around its limit.
        if slot is not None and not slot.acquire(timeout=remaining):
            raise FetchRefused("download_time_limit")
        try:
            # The host's turn, slot in hand so that requests leave at their turns. The first
            # wait is the crawler's own pacing (at most its threads over the rate), not the
            # server's doing: it moves the image's deadline. Later ones are counted in it.
            rate = policy.max_requests_per_second_per_host
            waited = politeness.wait_turn(parts.hostname, rate, None if first_request else deadline)
            if waited is None:
                raise FetchRefused("download_time_limit")
            if first_request:
                deadline, first_request = deadline + waited, False
            status, headers, body = _get(parts, port, deadline, timeout, policy, disallowed_directives, user_agent_token)
        finally:
            if slot is not None:
                slot.release()
        if status in REDIRECTS and headers.get("Location"):
            redirects += 1
            if redirects > policy.max_redirects:
                raise FetchRefused("too_many_redirects")
            url = urljoin(url, headers["Location"])
            continue
        if status in (429, 503):
            delay = busy.wait(headers.get("Retry-After"), deadline - time.monotonic())
            if delay is not None:
                time.sleep(delay)
                continue
        if status != 200:
            raise FetchRefused(f"http_{status}")
        return check_image_body(body, headers.get("Content-Type", ""), policy)


def _port(parts) -> int:
    """The port a URL's scheme and authority name; ``unsupported_url`` when there is none."""
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise FetchRefused("unsupported_url")
    try:
        parts.hostname.encode("idna")  # as the resolver and the Host header will need it
        return parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:  # a port that is not a number or out of range; a label too long or empty
        raise FetchRefused("unsupported_url") from None


def _get(
    parts,
    port: int,
    deadline: float,
    timeout: float,
    policy: FetchPolicy,
    disallowed_directives: set[str] | None,
    user_agent_token: str | None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a connection of its own; every failure raised as its reason code."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchRefused("download_time_limit")
    # The port is passed explicitly: http.client would read "::1" as host ":" port 1.
    if parts.scheme == "https":
        conn = _GuardedHTTPS(parts.hostname, port, timeout=min(timeout, remaining), context=tls_context())
    else:
        conn = _GuardedHTTP(parts.hostname, port, timeout=min(timeout, remaining))
    conn.policy = policy
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request("GET", path, headers={"User-Agent": user_agent(user_agent_token), "Accept": "image/*,*/*;q=0.5"})
        sock = conn.sock  # getresponse() drops conn.sock when the server closes after the response
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.headers, b""
        if disallowed_directives and is_disallowed(response.headers, disallowed_directives, user_agent_token):
            raise FetchRefused("robots_disallowed")
        return response.status, response.headers, _read_body(response, sock, deadline, timeout, policy)
    except (socket.timeout, TimeoutError):
        # The socket timeout is cut to what is left of the deadline: which one ran out?
        late = time.monotonic() >= deadline - 0.05
        raise FetchRefused("download_time_limit" if late else "read_timeout") from None
    except (ConnectionError, http.client.HTTPException, OSError):
        raise FetchRefused("connection_error") from None
    finally:
        conn.close()


def _read_body(
    response: http.client.HTTPResponse, sock: socket.socket, deadline: float, timeout: float, policy: FetchPolicy
) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > policy.max_image_bytes:
        raise FetchRefused("body_too_large")
    body = io.BytesIO()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchRefused("download_time_limit")
        sock.settimeout(min(timeout, remaining))
        # read1: at most one socket read, so a trickling server cannot hold us past the deadline.
        chunk = response.read1(CHUNK)
        if not chunk:
            return body.getvalue()
        body.write(chunk)
        if body.tell() > policy.max_image_bytes:
            raise FetchRefused("body_too_large")


def check_image_body(body: bytes, content_type: str, policy: FetchPolicy) -> bytes:
    """Refuse bodies that are empty, HTML, or declare more pixels than ``max_image_pixels``.

    Only the image header is parsed here (cheap); a body that passes but cannot be decoded
    is left to img2dataset's resizer, which counts it as failed_to_resize.
    """
    if not body:
        raise FetchRefused("empty_body")
    head = body[:512].lstrip().lower()
    if content_type.lower().startswith(("text/html", "application/xhtml")) or head.startswith((b"<!doctype html", b"<html")):
        raise FetchRefused("html_body")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(body)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise FetchRefused("decompression_bomb") from None
    except Exception:  # noqa: BLE001 - any header PIL cannot read: let the decoder judge
        return body
    if width * height > policy.max_image_pixels:
        raise FetchRefused("decompression_bomb")
    return body
