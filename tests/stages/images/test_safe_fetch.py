"""The download guard, against a hostile server on 127.0.0.1 (no other address is ever contacted)."""

from __future__ import annotations

import pytest

from sampleweb.hostile import EXPECTED_REASONS, UNENDING, HostileServer
from stages.images.safe_fetch import FetchPolicy, FetchRefused, fetch_image, parse_networks, refusal_reason

LOOPBACK = ("127.0.0.0/8",)
POLICY = FetchPolicy(allowed_networks=LOOPBACK, max_download_seconds=4.0, max_image_bytes=2 * 1024 * 1024, max_redirects=3)


@pytest.fixture(scope="module")
def server():
    with HostileServer(trickle_seconds=20) as s:
        with HostileServer() as other:
            s.redirect_target = other.url("/good.jpg")
            yield s


@pytest.mark.parametrize(
    "address,reason",
    [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
        ("192.168.1.1", "private"), ("169.254.169.254", "link_local"), ("fe80::1", "link_local"),
        ("100.64.0.1", "not_global"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"), ("fc00::1", "private"), ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link_local"), ("::ffff:127.0.0.1", "loopback"),
        ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
    ],
)
def test_address_check_on_resolved_addresses(address: str, reason: str | None) -> None:
    assert refusal_reason(address) == reason


def test_allowed_networks_open_ranges_on_purpose() -> None:
    allowed = parse_networks(["127.0.0.0/8", "10.0.0.0/24"])
    assert refusal_reason("127.0.0.2", allowed) is None and refusal_reason("::ffff:127.0.0.1", allowed) is None
    assert refusal_reason("10.0.0.9", allowed) is None and refusal_reason("10.0.1.9", allowed) == "private"
    assert refusal_reason("169.254.169.254", allowed) == "link_local"
    with pytest.raises(ValueError, match="allowed_networks: 'localhost'"):
        parse_networks(["localhost"])


@pytest.mark.parametrize("path", sorted(EXPECTED_REASONS))
def test_each_hostile_endpoint_gets_its_reason_within_bounds(server: HostileServer, path: str) -> None:
    hung_up = server.hung_up[path]
    if EXPECTED_REASONS[path] is None:
        assert fetch_image(server.url(path), POLICY, timeout=2) == server.good
    else:
        with pytest.raises(FetchRefused) as refused:
            fetch_image(server.url(path), POLICY, timeout=2, disallowed_directives={"noai", "noimageai"})
        assert str(refused.value) == EXPECTED_REASONS[path]
    if path in UNENDING:
        # Cut off at the bound, mid-answer: the server was still sending (the trickle lasts
        # 20 s, the endless body 6.5 GB) when the guard hung up.
        assert server.wait_for_hang_up(path, more_than=hung_up)


def test_truncated_body_is_left_to_the_decoder(server: HostileServer) -> None:
    assert fetch_image(server.url("/truncated.jpg"), POLICY) == server.good[:300]


def test_redirect_to_another_loopback_port_is_followed_and_checked(server: HostileServer) -> None:
    assert fetch_image(server.url("/elsewhere"), POLICY) == server.good
    only_this_port_host = FetchPolicy(allowed_networks=("127.0.0.1/32",))
    server.redirect_target = server.redirect_target.replace("127.0.0.1", "127.0.0.2")
    with pytest.raises(FetchRefused, match="refused_private_address"):
        fetch_image(server.url("/elsewhere"), only_this_port_host)


def test_nothing_is_requested_when_no_network_is_allowed(server: HostileServer) -> None:
    before = sum(server.requests.values())
    for path in EXPECTED_REASONS:
        with pytest.raises(FetchRefused, match="refused_private_address"):
            fetch_image(server.url(path), FetchPolicy())
    assert sum(server.requests.values()) == before


def test_retry_after_is_honoured_once_within_bound(server: HostileServer) -> None:
    # /busy.jpg answers 429 with Retry-After: 1, and 429 again to a retry that comes sooner.
    server.requests["/busy.jpg"] = 0
    assert fetch_image(server.url("/busy.jpg"), POLICY) == server.good
    assert server.requests["/busy.jpg"] == 2
    server.requests["/busy.jpg"] = 0
    with pytest.raises(FetchRefused, match="http_429"):
        fetch_image(server.url("/busy.jpg"), FetchPolicy(allowed_networks=LOOPBACK, max_retry_after_seconds=0.5))
