"""The certificate's notAfter, read from PEM without a crypto library (checked against one)."""

from __future__ import annotations

import base64
import datetime

import pytest
import trustme
from cryptography import x509

from segproxy.certs import not_after, not_after_der


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_not_after_of_a_server_certificate_matches_what_a_crypto_library_reads(
    ca: trustme.CA,
) -> None:
    cert = ca.issue_cert("analytics.example.com")
    chain = b"".join(p.bytes() for p in cert.cert_chain_pems)  # the server's first, then the CA
    expected = x509.load_pem_x509_certificate(chain).not_valid_after_utc.timestamp()
    assert not_after(chain) == expected


def test_a_file_with_the_key_before_the_certificate_still_reads(ca: trustme.CA) -> None:
    cert = ca.issue_cert("analytics.example.com")
    pem = cert.private_key_pem.bytes() + cert.cert_chain_pems[0].bytes()
    expected = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    assert not_after(pem) == expected.not_valid_after_utc.timestamp()


@pytest.mark.parametrize(
    ("tag", "text", "year"),
    [
        (0x17, b"491231235959Z", 2049),  # UTCTime: 00-49 are 20xx
        (0x17, b"500101000000Z", 1950),  # 50-99 are 19xx
        (0x18, b"21060101000000Z", 2106),  # GeneralizedTime past 2049
    ],
)
def test_both_time_encodings_of_rfc_5280(tag: int, text: bytes, year: int) -> None:
    def tlv(t: int, value: bytes) -> bytes:
        return bytes([t, len(value)]) + value

    validity = tlv(0x30, tlv(0x17, b"200101000000Z") + tlv(tag, text))
    tbs = tlv(0x30, tlv(0x02, b"\x01") + tlv(0x30, b"") + tlv(0x30, b"") + validity)
    found = not_after_der(tlv(0x30, tbs))
    assert found is not None
    assert datetime.datetime.fromtimestamp(found, datetime.UTC).year == year


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n"
        + base64.b64encode(b"\x30\x82\xff\xff\x30")
        + b"\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n"
        + base64.b64encode(b"\x04\x03abc")
        + b"\n-----END CERTIFICATE-----\n",
    ],
)
def test_anything_else_is_none_never_an_error(pem: bytes) -> None:
    assert not_after(pem) is None
