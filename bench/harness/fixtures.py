"""What the bench sends and serves: the track event, the bundle, the settings, the configs."""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

from harness.common import BENCH, INGEST_PATH, REPO, WRITE_KEY, BenchError

BUNDLE_MARKER = "segproxy-bench-bundle"
REAL_BUNDLE = (
    REPO / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd" / "standalone.js"
)

# The browser-shaped request head, captured once from Chromium (see the file's comment).
BROWSER_HEAD = BENCH / "fixtures" / "chromium-post-track.txt"
# What the bench sent before it had a browser-shaped request, kept as a shape of its own so
# that ratios stay comparable across commits: 4 headers besides Host and Content-Length.
FOUR_HEADER_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)

# Vocabulary of the generated stand-in bundle.
JS_WORDS = (
    "analytics track page identify group alias screen context integrations plugin "
    "segment destination settings event properties middleware queue dispatch flush "
    "retry storage cookie user anonymousId traits options callback promise emitter "
    "timeout deliver register deregister load ready reset debug timestamp messageId "
    "sentAt writeKey apiHost protocol metrics sampleRate bundle chunk loader script "
    "consent categories version library locale timezone campaign referrer search "
    "title"
)


def track_event_template(now: dt.datetime) -> bytes:
    """A realistic analytics.js (analytics-next) track event of about 1.5 KB."""
    ts = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    event: dict[str, Any] = {
        "timestamp": ts,
        "integrations": {},
        "event": "Product Added",
        "type": "track",
        "properties": {
            "product_id": "507f1f77bcf86cd799439011",
            "sku": "G-32",
            "category": "Games",
            "name": "Monopoly: 3rd Edition",
            "brand": "Hasbro",
            "variant": "200 pieces",
            "price": 18.99,
            "quantity": 1,
            "coupon": "MAYDEALS",
            "position": 3,
            "currency": "EUR",
            "cart_id": "skdjsidjsdkdj29j",
            "url": "https://shop.example.com/products/monopoly-3rd-edition",
            "image_url": "https://cdn.shop.example.com/images/products/monopoly-3rd-edition.jpg",
        },
        "context": {
            "page": {
                "path": "/products/monopoly-3rd-edition",
                "referrer": "https://www.google.com/",
                "search": "?utm_source=newsletter&utm_medium=email&utm_campaign=may_deals",
                "title": "Monopoly: 3rd Edition | Example Shop",
                "url": "https://shop.example.com/products/monopoly-3rd-edition"
                "?utm_source=newsletter&utm_medium=email&utm_campaign=may_deals",
            },
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
            " Chrome/126.0.0.0 Safari/537.36",
            "userAgentData": {
                "brands": [
                    {"brand": "Not/A)Brand", "version": "8"},
                    {"brand": "Chromium", "version": "126"},
                    {"brand": "Google Chrome", "version": "126"},
                ],
                "mobile": False,
                "platform": "Linux",
            },
            "locale": "de-DE",
            "library": {"name": "analytics.js", "version": "next-1.72.0"},
            "timezone": "Europe/Berlin",
            "campaign": {"source": "newsletter", "medium": "email", "name": "may_deals"},
        },
        "messageId": "__MESSAGE_ID__",
        "anonymousId": "8f1c2b3a-5d4e-4f60-9a7b-1c2d3e4f5a6b",
        "writeKey": WRITE_KEY,
        "userId": None,
        "sentAt": ts,
        "_metadata": {"bundled": ["Segment.io"], "unbundled": [], "bundledIds": []},
    }
    return json.dumps(event, separators=(",", ":")).encode()


def make_bundle(size: int = 140_000) -> bytes:
    """A deterministic, minified-JS-like file that compresses about as well as the real one."""
    rng = random.Random(20240501)
    words = JS_WORDS.split()
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$"

    def ident() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.choice((1, 1, 2, 2, 3))))

    parts = [
        f"/*! {BUNDLE_MARKER}: stands in for @segment/analytics-next dist/umd/standalone.js */\n",
        f'!function(){{"use strict";var __wk="{WRITE_KEY}";',
    ]
    total = sum(len(p) for p in parts)
    while total < size:
        a, b, c = ident(), ident(), ident()
        w, w2 = rng.choice(words), rng.choice(words)
        n = rng.randint(0, 99999)
        piece = rng.choice(
            (
                f"function {ident()}({a},{b}){{return {a}&&{a}.{w}?{b}.{w2}({a}.{w}):void 0}}",
                f'var {ident()}="{w}",{ident()}={n},{ident()}="{w2}-{n:x}";',
                f"{ident()}.prototype.{w}=function({a}){{var {c}=this;return new Promise("
                f"function(t,e){{{c}.{w2}({a},t,e)}})}};",
                f'if("undefined"!=typeof window&&window.{w}){{{ident()}({n},"{w2}")}}',
                f"case {n % 97}:return {a}.{w}=({b}||{{}}).{w2},{c}.push({a}),[3,{n % 13}];",
                f"{a}=Object.assign({{}},{b},{{{w}:{c}.{w2}||null,{w2}:{n}}});",
            )
        )
        parts.append(piece)
        total += len(piece)
    parts.append("}();\n")
    return "".join(parts).encode()


def load_bundle() -> tuple[bytes, str]:
    """The bundle the fake CDN serves: the real analytics-next build if npm installed it
    (with the write key filled in, as the CDN does), else a generated stand-in."""
    if REAL_BUNDLE.is_file():
        data = REAL_BUNDLE.read_bytes().replace(b"__WRITE_KEY__", WRITE_KEY.encode())
        return data, str(REAL_BUNDLE.relative_to(REPO))
    return make_bundle(), "generated stand-in (node_modules not installed)"


def settings_json() -> str:
    settings = {
        "integrations": {
            "Segment.io": {
                "apiKey": WRITE_KEY,
                "unbundledIntegrations": [],
                "addBundledMetadata": True,
                "maybeBundledConfigIds": {},
                "versionSettings": {"version": "4.4.7", "componentTypes": ["browser"]},
                "apiHost": "api.segment.io/v1",
            }
        },
        "plan": {"track": {"__default": {"enabled": True, "integrations": {}}}},
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0.1, "host": "api.segment.io/v1"},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
    }
    text = json.dumps(settings, separators=(",", ":"))
    # It is pasted into an nginx `return 200 '...'` string.
    assert "'" not in text and "$" not in text and "\\" not in text
    return text


def render(template: Path, dest: Path, values: dict[str, str]) -> None:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        raise BenchError(f"unrendered placeholder in {template}")
    dest.write_text(text)


def basic_auth() -> str:
    """The Authorization value analytics.js sends: Basic base64("<writeKey>:")."""
    return "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()


def browser_head(path: Path = BROWSER_HEAD) -> list[tuple[str, str]]:
    """The captured head's headers in their order (comments and the request line left out),
    with the bench's write key in Authorization instead of the captured one."""
    lines = [x for x in path.read_text().splitlines() if x and not x.startswith("#")]
    if not lines or lines[0] != f"POST {INGEST_PATH} HTTP/1.1":
        raise BenchError(f"{path}: the first line must be POST {INGEST_PATH} HTTP/1.1")
    head: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(": ")
        if not sep:
            raise BenchError(f"{path}: not a header line: {line!r}")
        head.append((name, basic_auth() if name.lower() == "authorization" else value))
    names = {name.lower() for name, _ in head}
    if not {"host", "content-length"} <= names:
        raise BenchError(f"{path}: the head needs Host and Content-Length lines")
    return head


def request_head(shape: str) -> list[tuple[str, str]]:
    """The headers of the ingest POST for a request shape ("4-header" or "browser"); Host's
    and Content-Length's values are filled in by wrk/post_track.lua."""
    if shape == "browser":
        return browser_head()
    return [
        ("Host", ""),
        ("Content-Type", "text/plain"),
        ("Authorization", basic_auth()),
        ("Origin", "https://shop.example.com"),
        ("User-Agent", FOUR_HEADER_UA),
        ("Content-Length", ""),
    ]


def write_head(dest: Path, head: list[tuple[str, str]]) -> None:
    """The head file wrk/post_track.lua reads: one "Name: value" line per header."""
    dest.write_text("".join(f"{name}: {value}\n" for name, value in head))
