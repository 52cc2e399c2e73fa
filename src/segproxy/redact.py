"""Write keys are secrets in logs and operator output: show enough to tell them apart, no more.

``mask`` keeps a short prefix and adds a digest, so two keys sharing a prefix stay apart
(``wk_sho…3fa2c1`` vs ``wk_sho…9b0e77``); ``redact_path`` masks the key inside Segment's CDN
paths (``/analytics.js/v1/<key>/…``, ``/v1/projects/<key>/settings``).
"""

from __future__ import annotations

import hashlib
import re

_KEY_IN_PATH = re.compile(r"(/analytics\.js/v1/|/projects/)([^/?#]+)")


def mask(write_key: str) -> str:
    if not write_key:
        return "(metrics)"
    digest = hashlib.sha256(write_key.encode()).hexdigest()[:6]
    shown = write_key[:6] if len(write_key) > 8 else write_key[:2]
    return f"{shown}…{digest}"


def redact_path(path: str) -> str:
    return _KEY_IN_PATH.sub(lambda m: m.group(1) + mask(m.group(2)), path)
