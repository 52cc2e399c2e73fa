"""When the configured TLS certificate expires: its ``notAfter``, read from the PEM file.

Python's ``ssl`` loads a server certificate but has no public way to read it back, so the
few fields on the way to ``notAfter`` are walked here (RFC 5280, 4.1: Certificate ->
tbsCertificate -> [version], serialNumber, signature, issuer, validity). Pure: bytes in, a
time out; anything unexpected is ``None`` (the metric is then absent, never wrong).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import re

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")
_SEQUENCE = 0x30
_VERSION = 0xA0  # [0] EXPLICIT, before the serial number, absent in v1 certificates
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18


class _Bad(Exception):
    pass


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, where its value starts, where it ends) of the element at ``at``."""
    if at + 2 > len(der):
        raise _Bad
    tag, size = der[at], der[at + 1]
    start = at + 2
    if size & 0x80:  # long form: the next (size & 0x7f) bytes hold the length
        count = size & 0x7F
        if count == 0 or count > 4 or start + count > len(der):
            raise _Bad
        size = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + size > len(der):
        raise _Bad
    return tag, start, start + size


def _time(tag: int, text: bytes) -> float:
    value = text.decode("ascii")
    if tag == _UTC_TIME and len(value) == 13 and value.endswith("Z"):
        year = int(value[:2])
        value = ("19" if year >= 50 else "20") + value  # RFC 5280, 4.1.2.5.1
    elif not (tag == _GENERALIZED_TIME and len(value) == 15 and value.endswith("Z")):
        raise _Bad
    if not value[:14].isdigit():
        raise _Bad
    fields = (value[0:4], value[4:6], value[6:8], value[8:10], value[10:12], value[12:14])
    year, month, day, hour, minute, second = (int(f) for f in fields)
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def not_after_der(der: bytes) -> float | None:
    """The end of a DER certificate's validity (unix seconds), or None if it is not one."""
    try:
        tag, start, _ = _tlv(der, 0)  # Certificate
        if tag != _SEQUENCE:
            return None
        tag, at, _ = _tlv(der, start)  # tbsCertificate
        if tag != _SEQUENCE:
            return None
        if der[at] == _VERSION:
            at = _tlv(der, at)[2]
        for _ in range(3):  # serialNumber, signature, issuer
            at = _tlv(der, at)[2]
        tag, at, _ = _tlv(der, at)  # validity
        if tag != _SEQUENCE:
            return None
        at = _tlv(der, at)[2]  # notBefore
        tag, start, end = _tlv(der, at)  # notAfter
        return _time(tag, der[start:end])
    except (_Bad, IndexError, ValueError):
        return None


def not_after(pem: bytes) -> float | None:
    """The first certificate's (the server's own, first in a chain file) ``notAfter``."""
    found = _PEM.search(pem)
    if found is None:
        return None
    try:
        der = base64.b64decode(b"".join(found.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return not_after_der(der)
