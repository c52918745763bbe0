"""The download guard over HTTPS: test sites on 127.0.0.1 with certificates from a test CA
(trustme), which the guard trusts only where a test hands it that CA."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
import trustme

from stages.images import safe_fetch
from stages.images.safe_fetch import FetchPolicy, FetchRefused, fetch_image

POLICY = FetchPolicy(allowed_networks=["127.0.0.1/32"])


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusted(ca: trustme.CA, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """The guard's HTTPS context for the test: certificate and host name checked, the test CA its only root."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    monkeypatch.setattr(safe_fetch, "tls_context", lambda: context)
    return context


def serving(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def self_signed(folder: Path) -> ssl.SSLContext:
    """A server presenting a certificate signed by its own key: a CA's own, which nobody trusts."""
    stranger = trustme.CA()
    pem = folder / "self-signed.pem"
    pem.write_bytes(stranger.private_key_pem.bytes() + stranger.cert_pem.bytes())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem)
    return context


def refusal(url: str, policy: FetchPolicy = POLICY) -> str:
    with pytest.raises(FetchRefused) as refused:
        fetch_image(url, policy)
    return str(refused.value)


def test_a_valid_chain_is_downloaded(ca, trusted, dns_server, sites) -> None:
    site = sites(tls=serving(ca.issue_cert("images.test", "127.0.0.1")))
    dns_server.answer("images.test", "127.0.0.1")
    good = site.routes["/good.jpg"][2]
    assert fetch_image(site.url("/good.jpg", "images.test"), POLICY) == good
    assert fetch_image(site.url("/good.jpg"), POLICY) == good  # the address itself, named in the certificate
    assert site.tls_failures == []


YESTERDAY = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)


@pytest.mark.parametrize(
    "server",
    [
        pytest.param(lambda ca, folder: self_signed(folder), id="self_signed"),
        pytest.param(lambda ca, folder: serving(trustme.CA().issue_cert("images.test")), id="unknown_issuer"),
        pytest.param(lambda ca, folder: serving(ca.issue_cert("elsewhere.test")), id="wrong_host"),
        pytest.param(lambda ca, folder: serving(ca.issue_cert("images.test", not_after=YESTERDAY)), id="expired"),
    ],
)
def test_a_certificate_that_does_not_check_out_is_refused_before_any_request(
    ca, trusted, dns_server, sites, tmp_path: Path, server
) -> None:
    site = sites(tls=server(ca, tmp_path))
    dns_server.answer("images.test", "127.0.0.1")
    assert refusal(site.url("/good.jpg", "images.test")) == "certificate_error"
    site.wait_until(lambda: len(site.tls_failures) == 1, "the handshake refused")
    assert site.requests == []


def test_without_a_test_ca_the_system_trust_store_decides(ca, dns_server, sites) -> None:
    site = sites(tls=serving(ca.issue_cert("images.test")))
    dns_server.answer("images.test", "127.0.0.1")
    assert safe_fetch.tls_context is safe_fetch.system_tls_context
    assert refusal(site.url("/good.jpg", "images.test")) == "certificate_error"
    assert site.requests == []


def test_no_common_tls_version_is_a_tls_error(ca, trusted, dns_server, sites) -> None:
    only_tls13 = serving(ca.issue_cert("images.test"))
    only_tls13.minimum_version = ssl.TLSVersion.TLSv1_3
    trusted.maximum_version = ssl.TLSVersion.TLSv1_2
    site = sites(tls=only_tls13)
    dns_server.answer("images.test", "127.0.0.1")
    assert refusal(site.url("/good.jpg", "images.test")) == "tls_error"
    assert site.requests == []


@pytest.mark.parametrize(
    "first,then,reason",
    [
        ("http", "https://images.test", None),  # upgrade
        ("https", "http://plain.test", None),  # downgrade to a permitted address: followed, as any hop
        ("https", "http://refused.test", "refused_private_address"),
        ("https", "https://wrong.test", "certificate_error"),
    ],
)
def test_redirects_between_http_and_https_are_checked_hop_by_hop(
    ca, trusted, dns_server, sites, first: str, then: str, reason: str | None
) -> None:
    secure = sites(tls=serving(ca.issue_cert("images.test")))
    plain = sites()
    wrong = sites(tls=serving(ca.issue_cert("elsewhere.test")))
    refused = sites("127.0.0.2")
    for name in ("images.test", "plain.test", "wrong.test"):
        dns_server.answer(name, "127.0.0.1")
    dns_server.answer("refused.test", "127.0.0.2")
    sites_by_origin = {"https://images.test": secure, "http://plain.test": plain, "https://wrong.test": wrong,
                       "http://refused.test": refused}  # fmt: skip
    target = sites_by_origin[then]
    start = secure if first == "https" else plain
    start.redirect("/away", f"{then}:{target.port}/good.jpg")
    url = start.url("/away", "images.test" if first == "https" else "plain.test")
    if reason is None:
        assert fetch_image(url, POLICY) == start.routes["/good.jpg"][2]
        assert [path for path, _ in target.requests] == ["/good.jpg"]
    else:
        assert refusal(url) == reason
        assert target.requests == []
    assert refused.connections == 0
