"""What the download guard's tests share: a DNS server of their own and web sites, all on
loopback addresses (127.0.0.1, and 127.0.0.2 where a test needs a second address; Linux
routes all of 127/8 to lo). No test name ever reaches the system resolver: the ``dns``
fixture points the guard's resolver at the test's DNS server.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from sampleweb.hostile import jpeg_bytes
from stages.images import safe_fetch

WAIT = 60.0  # generous: the machine may be loaded
JPEG = jpeg_bytes()

# A route answers a request: (status, headers, body), or a function that writes the answer.
Route = tuple[int, dict[str, str], bytes] | Callable[[BaseHTTPRequestHandler], None]


class DnsServer:
    """A DNS server on a free UDP port of 127.0.0.1 that answers A queries from its zone.

    ``answer(name, "127.0.0.2", then=("127.0.0.1",))`` answers the first lookup of ``name``
    with 127.0.0.2 and every later one with 127.0.0.1 (TTL 0: nothing may cache it); a
    name not in the zone is NXDOMAIN. ``queries`` counts the queries received per name.
    """

    def __init__(self) -> None:
        self.zone: dict[str, list[tuple[str, ...]]] = {}
        self.queries: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def answer(self, name: str, *addresses: str, then: tuple[str, ...] = ()) -> None:
        with self._lock:
            self.zone[name.lower()] = [addresses, then] if then else [addresses]

    def close(self) -> None:
        self._stopping = True
        self._sock.sendto(b"", self._sock.getsockname())  # wakes the blocked recvfrom
        self._thread.join(WAIT)
        self._sock.close()

    def _serve(self) -> None:
        while True:
            data, client = self._sock.recvfrom(4096)
            if self._stopping:
                return
            query = dns.message.from_wire(data)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            response = dns.message.make_response(query)
            with self._lock:
                self.queries[name] += 1
                lookups = self.zone.get(name)
                seen = self.queries[name]
            if lookups is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A:
                addresses = lookups[min(seen, len(lookups)) - 1]
                response.answer.append(dns.rrset.from_text(question.name, 0, "IN", "A", *addresses))
            self._sock.sendto(response.to_wire(), client)

    def resolve(self, host: str, port: int) -> list[tuple]:
        """The guard's resolver, by getaddrinfo's contract, asking this server only.

        Stands in for the system resolver, which cannot be pointed at a test's DNS server
        without changing system files. Address literals are parsed, as getaddrinfo does.
        """
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        try:
            response = dns.query.udp(dns.message.make_query(host, "A"), "127.0.0.1", timeout=WAIT, port=self.port)
        except dns.exception.Timeout:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution") from None
        addresses = [rdata.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rdata in rrset]
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port)) for address in addresses]


class Site:
    """An HTTP server (HTTPS with ``tls``) on a loopback address, serving ``routes``.

    It counts what reached it, so a test can prove what never did: ``connections``
    accepted, ``requests`` as (path, User-Agent), ``in_flight`` requests being answered and
    the most at once, TLS handshakes that failed. While ``hold`` is cleared, every answer
    waits for it.
    """

    def __init__(self, address: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.address, self.tls = address, tls
        self.routes: dict[str, Route] = {"/good.jpg": (200, {"Content-Type": "image/jpeg"}, JPEG)}
        self.connections = 0
        self.requests: list[tuple[str, str]] = []
        self.in_flight = self.most_in_flight = 0
        self.tls_failures: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        self.changed = threading.Condition()
        self._server = _Server((address, port), _handler_for(self), self)
        self.port = self._server.server_address[1]
        # A short poll: shutdown() waits for one, after every test.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"{'https' if self.tls else 'http'}://{host or self.address}:{self.port}{path}"

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self.routes[path] = (status, {"Location": location}, b"")

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(condition, WAIT):
                raise AssertionError(f"{self.url('')} never reached: {what}")

    def close(self) -> None:
        self.hold.set()
        self._server.shutdown()
        self._server.server_close()

    def _update(self, change: Callable[[], None]) -> None:
        with self.changed:
            change()
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.changed.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, site: Site) -> None:
        self.site = site
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks getfqdn() for its name: for 127.0.0.2 that is a
        # reverse lookup at the system's DNS server, off this machine.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self) -> tuple[socket.socket, object]:
        request, client = super().get_request()
        self.site._update(lambda: setattr(self.site, "connections", self.site.connections + 1))
        return request, client

    def finish_request(self, request: socket.socket, client_address: object) -> None:
        if self.site.tls is None:
            return super().finish_request(request, client_address)
        request.settimeout(WAIT)
        try:
            tls_request = self.site.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as failed:
            self.site._update(lambda: self.site.tls_failures.append(str(failed)))
            return
        try:
            super().finish_request(tls_request, client_address)
        finally:
            tls_request.close()


def _handler_for(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, closed after the answer.

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            def start() -> None:
                site.requests.append((self.path, self.headers.get("User-Agent", "")))
                site.in_flight += 1

            site._update(start)
            site.hold.wait(WAIT)
            route = site.routes.get(self.path, (404, {}, b"not found"))
            # Counted out before answering: the client cannot open its next connection
            # before it has read this answer, so most_in_flight is never overcounted.
            site._update(lambda: setattr(site, "in_flight", site.in_flight - 1))
            try:
                if callable(route):
                    route(self)
                else:
                    status, headers, body = route
                    self.send_response(status)
                    for key, value in {"Content-Length": str(len(body)), **headers}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the guard hung up on purpose (a refused body)

    return Handler


@pytest.fixture
def dns_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[DnsServer]:
    """The test's DNS server, the guard's resolver pointed at it for the test."""
    server = DnsServer()
    monkeypatch.setattr(safe_fetch, "resolve", server.resolve)
    yield server
    server.close()


@pytest.fixture
def sites() -> Iterator[Callable[..., Site]]:
    """``sites(address="127.0.0.1", port=0, tls=None)`` starts a Site, stopped after the test."""
    started: list[Site] = []

    def start(address: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> Site:
        started.append(Site(address, port, tls))
        return started[-1]

    yield start
    for site in started:
        site.close()


@pytest.fixture
def twin_sites(sites: Callable[..., Site]) -> tuple[Site, Site]:
    """A site on 127.0.0.1 and one on 127.0.0.2 on the same port: the two addresses a name
    may resolve to, one URL for both."""
    first = sites("127.0.0.1")
    for _ in range(20):
        try:
            return first, sites("127.0.0.2", first.port)
        except OSError:  # that port is taken on 127.0.0.2: try another pair
            first = sites("127.0.0.1")
    raise AssertionError("no port free on both 127.0.0.1 and 127.0.0.2")
