"""The download guard on named hosts: names resolved by the test's own DNS server (every
answer a loopback address), the check after resolution, the per-host cap, X-Robots-Tag
and the default limits.
"""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from sampleweb.hostile import bomb_png
from stages.images.img2dataset_patches import guarded_download_image_with_retry
from stages.images.safe_fetch import FetchPolicy, FetchRefused, fetch_image

JPEG_HEADERS = {"Content-Type": "image/jpeg"}
# img2dataset 1.47's download() refuses these unless told otherwise; the stage keeps them.
IMG2DATASET_DIRECTIVES = {"noai", "noimageai", "noindex", "noimageindex"}
WAIT = 120.0
# The defaults, with the one network the test sites live on opened.
DEFAULTS = replace(FetchPolicy(), allowed_networks=("127.0.0.1/32",))


def refusal(url: str, policy: FetchPolicy, **kwargs: object) -> str:
    with pytest.raises(FetchRefused) as refused:
        fetch_image(url, policy, **kwargs)
    return str(refused.value)


# Names


def test_a_name_resolving_to_a_refused_address_is_refused_before_connecting(dns_server, sites) -> None:
    site = sites()
    dns_server.answer("intranet.test", "127.0.0.1")
    assert refusal(site.url("/good.jpg", "intranet.test"), FetchPolicy()) == "refused_private_address"
    assert dns_server.queries["intranet.test"] == 1
    assert site.connections == 0


def test_a_name_in_an_allowed_network_is_fetched_with_one_lookup(dns_server, twin_sites) -> None:
    refused_site, allowed_site = twin_sites
    dns_server.answer("images.test", "127.0.0.2")
    policy = FetchPolicy(allowed_networks=["127.0.0.2/32"])
    assert fetch_image(allowed_site.url("/good.jpg", "images.test"), policy) == allowed_site.routes["/good.jpg"][2]
    # One lookup, and the connection made to the address it checked: a second lookup for
    # the connection would be the rebinding window.
    assert dns_server.queries["images.test"] == 1
    assert (allowed_site.connections, refused_site.connections) == (1, 0)


def test_only_the_permitted_answers_of_a_name_are_connected_to(dns_server, twin_sites) -> None:
    refused_site, allowed_site = twin_sites
    dns_server.answer("mixed.test", "127.0.0.1", "127.0.0.2")
    assert fetch_image(allowed_site.url("/good.jpg", "mixed.test"), FetchPolicy(allowed_networks=["127.0.0.2/32"]))
    assert (allowed_site.connections, refused_site.connections) == (1, 0)


def test_a_name_rebound_to_a_refused_address_is_refused_at_connect_time(dns_server, twin_sites) -> None:
    refused_site, allowed_site = twin_sites
    policy = FetchPolicy(allowed_networks=["127.0.0.2/32"])
    url = allowed_site.url("/good.jpg", "rebind.test")
    dns_server.answer("rebind.test", "127.0.0.2", then=("127.0.0.1",))
    assert fetch_image(url, policy)
    assert refusal(url, policy) == "refused_private_address"
    assert (allowed_site.connections, refused_site.connections) == (1, 0)


def test_a_name_rebound_between_redirect_hops_is_refused(dns_server, twin_sites) -> None:
    refused_site, allowed_site = twin_sites
    dns_server.answer("hop.test", "127.0.0.2", then=("127.0.0.1",))
    for site in twin_sites:
        site.redirect("/start", allowed_site.url("/good.jpg", "hop.test"))
    assert refusal(allowed_site.url("/start", "hop.test"), FetchPolicy(allowed_networks=["127.0.0.2/32"])) == (
        "refused_private_address"
    )
    assert dns_server.queries["hop.test"] == 2  # each hop resolved, each checked
    assert [path for path, _ in allowed_site.requests] == ["/start"]
    assert refused_site.connections == 0


def test_a_name_that_does_not_resolve_is_a_dns_error_after_one_query(dns_server) -> None:
    assert refusal("http://nowhere.test/a.jpg", DEFAULTS) == "dns_error"
    assert dns_server.queries["nowhere.test"] == 1
    # What img2dataset records for the sample, at its default of no retries.
    assert guarded_download_image_with_retry((7, "http://nowhere.test/a.jpg"), 10, 0, None, None) == (7, None, "dns_error")
    assert dns_server.queries["nowhere.test"] == 2


@pytest.mark.parametrize(
    "url,lookup",
    [
        ("http://[2001:db8::1]/a.jpg", ("2001:db8::1", 80)),
        ("https://named.test/a.jpg", ("named.test", 443)),
        ("http://named.test:8080/a.jpg", ("named.test", 8080)),
    ],
)
def test_the_port_is_the_urls_or_its_schemes(dns_server, monkeypatch: pytest.MonkeyPatch, url: str, lookup) -> None:
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[tuple]:
        asked.append((host, port))
        return dns_server.resolve(host, port)

    monkeypatch.setattr("stages.images.safe_fetch.resolve", resolve)
    dns_server.answer("named.test", "127.0.0.1")
    assert refusal(url, FetchPolicy()) == "refused_private_address"
    assert asked == [lookup]


@pytest.mark.parametrize(
    "url", ["http://" + "a" * 64 + ".test/a.jpg", "http://a..test/a.jpg", "http://images.test:99999/", "ftp://images.test/a.jpg"]
)
def test_a_url_no_request_can_be_made_for_is_unsupported(dns_server, url: str) -> None:
    assert refusal(url, DEFAULTS) == "unsupported_url"
    assert sum(dns_server.queries.values()) == 0


# Connections per host


def test_connections_per_host_are_capped_within_the_images_deadline(dns_server, sites) -> None:
    site, other = sites(), sites()
    dns_server.answer("capped.test", "127.0.0.1")
    dns_server.answer("other.test", "127.0.0.1")
    policy = replace(DEFAULTS, per_host_connections=2)
    url = site.url("/good.jpg", "capped.test")
    site.hold.clear()
    bodies: list[bytes] = []
    # Held as long as the test needs, however loaded the machine: same cap, longer limits.
    patient = replace(policy, max_download_seconds=WAIT)
    held = [threading.Thread(target=lambda: bodies.append(fetch_image(url, patient, timeout=WAIT))) for _ in range(2)]
    for thread in held:
        thread.start()
    site.wait_until(lambda: site.in_flight == 2, "two requests held")
    # A third image of the host waits for a slot, and gives up at its own deadline
    # without ever connecting; another host is not held up by this one's cap.
    assert refusal(url, replace(policy, max_download_seconds=1.0)) == "download_time_limit"
    assert fetch_image(other.url("/good.jpg", "other.test"), policy)
    assert site.connections == 2
    site.hold.set()
    for thread in held:
        thread.join(WAIT)
    assert len(bodies) == 2 and site.most_in_flight == 2

    results: list[bytes] = []
    many = [threading.Thread(target=lambda: results.append(fetch_image(url, policy))) for _ in range(6)]
    for thread in many:
        thread.start()
    for thread in many:
        thread.join(WAIT)
    assert len(results) == 6 and site.most_in_flight == 2


# X-Robots-Tag


@pytest.mark.parametrize(
    "tag,token,refused",
    [
        ("noindex", None, True),
        ("noimageindex", None, True),
        ("nofollow, NoIndex", None, True),
        ("img2dataset: noimageindex", "img2dataset", True),
        ("otherbot: noindex", "img2dataset", False),
        ("nofollow", None, False),
    ],
)
def test_x_robots_tag_noindex_and_noimageindex(dns_server, sites, tag: str, token: str | None, refused: bool) -> None:
    site = sites()
    dns_server.answer("robots.test", "127.0.0.1")
    site.routes["/tagged.jpg"] = (200, {**JPEG_HEADERS, "X-Robots-Tag": tag}, site.routes["/good.jpg"][2])
    url = site.url("/tagged.jpg", "robots.test")
    if refused:
        assert refusal(url, DEFAULTS, disallowed_directives=IMG2DATASET_DIRECTIVES, user_agent_token=token) == (
            "robots_disallowed"
        )
    else:
        assert fetch_image(url, DEFAULTS, disallowed_directives=IMG2DATASET_DIRECTIVES, user_agent_token=token)
    # The token is in the User-Agent, as img2dataset sends it: what the site's tags address.
    assert (f"(compatible; {token};" in site.requests[0][1]) == (token is not None)


# The default limits: FetchPolicy() as it is, the test sites' network opened.


def test_default_redirect_limit(dns_server, sites) -> None:
    site = sites()
    dns_server.answer("hops.test", "127.0.0.1")
    for hop in range(1, 7):
        site.redirect(f"/hop/{hop}", f"/hop/{hop - 1}" if hop > 1 else "/good.jpg")
    assert fetch_image(site.url("/hop/5", "hops.test"), DEFAULTS)
    assert refusal(site.url("/hop/6", "hops.test"), DEFAULTS) == "too_many_redirects"
    assert [path for path, _ in site.requests if path == "/good.jpg"] == ["/good.jpg"]


def test_default_body_limit_by_declared_length_and_while_reading(dns_server, sites) -> None:
    site = sites()
    dns_server.answer("big.test", "127.0.0.1")
    limit = FetchPolicy().max_image_bytes
    jpeg = site.routes["/good.jpg"][2]
    at_limit = jpeg + b"\0" * (limit - len(jpeg))
    site.routes["/at-limit.jpg"] = (200, JPEG_HEADERS, at_limit)
    # Declares one byte more than the limit; sends a few.
    site.routes["/declared.jpg"] = (200, {**JPEG_HEADERS, "Content-Length": str(limit + 1)}, jpeg)

    def undeclared(handler) -> None:  # one byte more than the limit, length unsaid
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.end_headers()
        handler.wfile.write(at_limit + b"\0")

    site.routes["/undeclared.jpg"] = undeclared
    assert len(fetch_image(site.url("/at-limit.jpg", "big.test"), DEFAULTS)) == limit
    assert refusal(site.url("/declared.jpg", "big.test"), DEFAULTS) == "body_too_large"
    assert refusal(site.url("/undeclared.jpg", "big.test"), DEFAULTS) == "body_too_large"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns above 89 M pixels
def test_default_pixel_limit(dns_server, sites) -> None:
    site = sites()
    dns_server.answer("pixels.test", "127.0.0.1")
    assert FetchPolicy().max_image_pixels == 10_000 * 10_000
    site.routes["/at-limit.png"] = (200, {"Content-Type": "image/png"}, bomb_png(10_000, 10_000))
    site.routes["/over.png"] = (200, {"Content-Type": "image/png"}, bomb_png(10_001, 10_000))
    assert fetch_image(site.url("/at-limit.png", "pixels.test"), DEFAULTS)
    assert refusal(site.url("/over.png", "pixels.test"), DEFAULTS) == "decompression_bomb"


def test_default_retry_after_bound(dns_server, sites) -> None:
    site = sites()
    dns_server.answer("busy.test", "127.0.0.1")
    too_long = FetchPolicy().max_retry_after_seconds + 1
    site.routes["/busy.jpg"] = (429, {"Retry-After": f"{too_long:g}"}, b"")
    assert refusal(site.url("/busy.jpg", "busy.test"), DEFAULTS) == "http_429"
    assert len(site.requests) == 1  # not waited for, not asked again


def test_the_safety_doc_states_the_defaults() -> None:
    policy = FetchPolicy()
    defaults = {
        "allowed_networks": "nothing opened" if not policy.allowed_networks else ", ".join(policy.allowed_networks),
        "max_download_seconds": f"{policy.max_download_seconds:g} s",
        "max_redirects": f"at most {policy.max_redirects}",
        "max_image_bytes": f"{policy.max_image_bytes // 2**20} MiB",
        "max_image_pixels": f"{policy.max_image_pixels // 10**6} M pixels",
        "max_retry_after_seconds": f"`max_retry_after_seconds` ({policy.max_retry_after_seconds:g})",
        "per_host_connections": "no cap" if not policy.per_host_connections else f"{policy.per_host_connections} ",
    }
    safety = (Path(__file__).parents[3] / "docs" / "safety.md").read_text()
    for param, default in defaults.items():
        row = next(line for line in safety.splitlines() if line.startswith("|") and f"`{param}`" in line)
        assert default in row, f"docs/safety.md's row for {param} does not give its default {default!r}: {row}"


def test_every_test_the_safety_doc_names_exists() -> None:
    tests = Path(__file__).parents[2]
    defined = {name for path in tests.rglob("test_*.py") for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    named = set(re.findall(r"`(?:[\w/]+\.py::)?(test_\w+)`", (tests.parent / "docs" / "safety.md").read_text()))
    assert named and named <= defined, f"docs/safety.md names tests that do not exist: {sorted(named - defined)}"
