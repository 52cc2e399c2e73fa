"""Routing: only the Segment CDN and Tracking API paths real clients use, and no spelling tricks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.routes import API_ENDPOINTS, CDN_KINDS, Kind, Reject, Route, match

KEY = "wk_Ab0-9_z"

CDN_METHODS = "GET, HEAD, OPTIONS"
API_METHODS = "POST, OPTIONS"


def route_of(method: str, target: str, prefix: str = "") -> Route:
    result = match(method, target, prefix)
    assert isinstance(result, Route), result
    return result


def reject_of(method: str, target: str, prefix: str = "") -> Reject:
    result = match(method, target, prefix)
    assert isinstance(result, Reject), result
    return result


# ---------------------------------------------------------------------------------------------
# CDN paths (the ones analytics.js loads; docs/threat-model.md, "Routing")


@pytest.mark.parametrize("file", ["analytics.min.js", "analytics.classic.js"])
def test_browser_script_is_routed_with_its_write_key(file: str) -> None:
    route = route_of("GET", f"/analytics.js/v1/{KEY}/{file}")
    assert route.kind is Kind.SCRIPT
    assert route.write_key == KEY
    assert route.upstream_path == f"/analytics.js/v1/{KEY}/{file}"


def test_other_files_under_the_script_path_are_not_found() -> None:
    assert reject_of("GET", f"/analytics.js/v1/{KEY}/analytics.js").status == 404
    assert reject_of("GET", f"/analytics.js/v1/{KEY}/").status == 404


def test_browser_settings_are_routed_with_their_write_key() -> None:
    route = route_of("GET", f"/v1/projects/{KEY}/settings")
    assert route.kind is Kind.SETTINGS
    assert route.write_key == KEY
    assert route.upstream_path == f"/v1/projects/{KEY}/settings"


def test_settings_without_the_v1_prefix_go_to_the_same_upstream_path() -> None:
    route = route_of("GET", f"/projects/{KEY}/settings")
    assert route.kind is Kind.SETTINGS
    assert route.upstream_path == f"/v1/projects/{KEY}/settings"


def test_write_key_longer_than_128_characters_is_not_found() -> None:
    assert reject_of("GET", f"/v1/projects/{'k' * 129}/settings").status == 404
    assert route_of("GET", f"/v1/projects/{'k' * 128}/settings").write_key == "k" * 128


@pytest.mark.parametrize(
    "name",
    [
        "ajs-destination.bundle.40628baed746e9904edc.js",
        "queryString.bundle.1a2b3c4d.js",
        "407.bundle.61efa1acb302134c434b.js",
        "tsub-middleware.bundle.0f0f0f.js.map",
    ],
)
def test_lazy_bundle_chunks_are_routed(name: str) -> None:
    route = route_of("GET", f"/analytics-next/bundles/{name}")
    assert route.kind is Kind.BUNDLE
    assert route.write_key is None
    assert route.upstream_path == f"/analytics-next/bundles/{name}"


def test_bundle_directory_holds_only_scripts_and_source_maps() -> None:
    assert reject_of("GET", "/analytics-next/bundles/index.html").status == 404
    assert reject_of("GET", "/analytics-next/bundles/sub/dir.bundle.js").status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/next-integrations/integrations/google-analytics/2.18.0/google-analytics.dynamic.js.gz",
        "/next-integrations/integrations/vendor/commons.59560acf1a5a3f6f5b2b.js.gz",
        "/next-integrations/actions/amplitude-plugins/a1b2c3d4e5.js",
        "/next-integrations/middleware/ajs-sample/latest/ajs-sample.js.gz",
        "/next-integrations/actions/@segment/analytics-browser-actions-braze.js",
    ],
)
def test_next_integrations_files_are_routed_as_they_are_named(path: str) -> None:
    route = route_of("GET", path)
    assert route.kind is Kind.INTEGRATION
    assert route.upstream_path == path


def test_next_integrations_only_serves_scripts() -> None:
    assert reject_of("GET", "/next-integrations/integrations/x/1.0/readme.txt").status == 404
    assert reject_of("GET", "/next-integrations").status == 404


def test_unknown_paths_are_not_found() -> None:
    for target in ["/", "/favicon.ico", "/v2/t", "/v1/", "/v1/tracks", "/v1/T", "/admin"]:
        reject = reject_of("GET", target)
        assert (reject.status, reject.code) == (404, "not_found"), target


@pytest.mark.parametrize(
    "target", [f"/analytics.js/v1/{KEY}/analytics.min.js", f"/v1/projects/{KEY}/settings"]
)
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_cdn_paths_answer_get_head_and_preflight(method: str, target: str) -> None:
    assert route_of(method, target).kind in CDN_KINDS


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "TRACE", "get"])
def test_cdn_paths_refuse_other_methods_with_405_and_allow(method: str) -> None:
    reject = reject_of(method, f"/v1/projects/{KEY}/settings")
    assert reject.status == 405
    assert reject.allow == CDN_METHODS


# ---------------------------------------------------------------------------------------------
# Tracking API paths (the ones Segment's clients post to; docs/threat-model.md, "Routing")


@pytest.mark.parametrize("endpoint", ["t", "p", "i", "g", "a", "s", "b"])
def test_browser_api_endpoints_are_routed(endpoint: str) -> None:
    route = route_of("POST", f"/v1/{endpoint}")
    assert route.kind is Kind.TRACK
    assert route.endpoint == endpoint
    assert route.upstream_path == f"/v1/{endpoint}"
    assert route.write_key is None


@pytest.mark.parametrize(
    "endpoint", ["track", "identify", "page", "screen", "group", "alias", "batch", "import"]
)
def test_http_api_endpoints_are_routed(endpoint: str) -> None:
    route = route_of("POST", f"/v1/{endpoint}")
    assert route.kind is Kind.TRACK
    assert route.endpoint == endpoint
    assert route.upstream_path == f"/v1/{endpoint}"


def test_every_known_api_endpoint_has_a_route() -> None:
    for endpoint in API_ENDPOINTS:
        assert route_of("POST", f"/v1/{endpoint}").endpoint == endpoint


def test_browser_metrics_endpoint_is_its_own_kind() -> None:
    route = route_of("POST", "/v1/m")
    assert route.kind is Kind.METRICS
    assert route.endpoint == "m"
    assert route.upstream_path == "/v1/m"


@pytest.mark.parametrize("target", ["/v1/t", "/v1/batch", "/v1/m"])
def test_api_paths_accept_cors_preflight(target: str) -> None:
    assert isinstance(match("OPTIONS", target), Route)


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "post"])
@pytest.mark.parametrize("target", ["/v1/t", "/v1/batch", "/v1/m"])
def test_api_paths_refuse_other_methods_with_405_and_allow(method: str, target: str) -> None:
    reject = reject_of(method, target)
    assert (reject.status, reject.code) == (405, "method_not_allowed")
    assert reject.allow == API_METHODS


@pytest.mark.parametrize("kind_path", [("/healthz", Kind.HEALTHZ), ("/readyz", Kind.READYZ)])
def test_health_probes_answer_get_and_head_only(kind_path: tuple[str, Kind]) -> None:
    path, kind = kind_path
    assert route_of("GET", path).kind is kind
    assert route_of("HEAD", path).kind is kind
    reject = reject_of("POST", path)
    assert (reject.status, reject.allow) == (405, "GET, HEAD")


# ---------------------------------------------------------------------------------------------
# Prefix mounting


def test_prefixed_paths_route_to_unprefixed_upstream_paths() -> None:
    assert route_of("POST", "/seg/v1/t", "/seg").upstream_path == "/v1/t"
    script = route_of("GET", f"/seg/analytics.js/v1/{KEY}/analytics.min.js", "/seg")
    assert script.upstream_path == f"/analytics.js/v1/{KEY}/analytics.min.js"
    bundle = route_of("GET", "/a/b/analytics-next/bundles/x.bundle.1.js", "/a/b")
    assert bundle.upstream_path == "/analytics-next/bundles/x.bundle.1.js"


def test_with_a_prefix_unprefixed_paths_are_not_found() -> None:
    assert reject_of("POST", "/v1/t", "/seg").status == 404
    assert reject_of("GET", f"/v1/projects/{KEY}/settings", "/seg").status == 404


def test_prefix_matches_whole_segments_only() -> None:
    assert reject_of("POST", "/segment/v1/t", "/seg").status == 404
    assert reject_of("GET", "/seg", "/seg").status == 404


def test_health_probes_answer_with_and_without_the_prefix() -> None:
    assert route_of("GET", "/healthz", "/seg").kind is Kind.HEALTHZ
    assert route_of("GET", "/seg/healthz", "/seg").kind is Kind.HEALTHZ
    assert route_of("GET", "/seg/readyz", "/seg").kind is Kind.READYZ


# ---------------------------------------------------------------------------------------------
# Query and fragment


def test_query_string_is_dropped_from_the_upstream_path() -> None:
    route = route_of("GET", f"/v1/projects/{KEY}/settings?cb=123&x=../../etc")
    assert route.upstream_path == f"/v1/projects/{KEY}/settings"
    assert route_of("POST", "/v1/t?writeKey=abc").upstream_path == "/v1/t"


def test_percent_and_dots_in_the_query_do_not_reject_the_request() -> None:
    assert route_of("POST", "/v1/batch?x=%2e%2e%2f&y=//\\").upstream_path == "/v1/batch"


def test_fragment_is_dropped() -> None:
    assert route_of("POST", "/v1/t#frag").upstream_path == "/v1/t"


# ---------------------------------------------------------------------------------------------
# Refused request targets: 4xx before any routing


def test_connect_is_refused_with_405() -> None:
    reject = reject_of("CONNECT", "api.segment.io:443")
    assert (reject.status, reject.code) == (405, "method_not_allowed")


def test_connect_is_refused_even_for_an_origin_form_route() -> None:
    assert reject_of("CONNECT", "/v1/t").status == 405


@pytest.mark.parametrize(
    "target",
    [
        "http://api.segment.io/v1/t",
        "https://evil.example/v1/projects/k/settings",
        "api.segment.io/v1/t",
        "",
        "?/v1/t",
    ],
)
def test_absolute_form_target_is_rejected_before_any_routing(target: str) -> None:
    reject = reject_of("POST", target)
    assert (reject.status, reject.code) == (400, "bad_target")


def test_asterisk_form_target_is_rejected() -> None:
    reject = reject_of("OPTIONS", "*")
    assert (reject.status, reject.code) == (400, "bad_target")


@pytest.mark.parametrize(
    "target",
    [
        f"/v1/projects/{KEY}%2Fx/settings",
        "/analytics-next/bundles/%2e%2e/secret.js",
        "/v1/%74",
        "/%2e%2e/v1/t",
    ],
)
def test_percent_encoded_path_is_rejected(target: str) -> None:
    reject = reject_of("GET", target)
    assert (reject.status, reject.code) == (400, "bad_path")


@pytest.mark.parametrize(
    "target",
    [
        "/analytics-next/bundles/../bundles/x.js",
        "/next-integrations/integrations/../../v1/t.js",
        "/next-integrations/./integrations/a/1/a.js.gz",
        "/v1/t/..",
        "/v1/t/.",
        "/./v1/t",
        "/seg/../v1/t",
    ],
)
def test_dot_segments_are_rejected(target: str) -> None:
    reject = reject_of("GET", target)
    assert (reject.status, reject.code) == (400, "bad_path")


@pytest.mark.parametrize(
    "target",
    [
        "//v1/t",
        "/v1//t",
        "//evil.example/analytics-next/bundles/x.js",
        "/analytics-next/bundles//x.js",
        "/analytics-next/bundles\\x.js",
        "/v1\\t",
    ],
)
def test_empty_segments_and_backslashes_are_rejected(target: str) -> None:
    assert reject_of("POST", target).status == 400


@pytest.mark.parametrize(
    "target", ["/v1/t\x00", "/v1/ t", "/v1/t\r\nX: y", "/v1/t\x7f", "/v1/tä", "/v1/\u2024t"]
)
def test_control_space_and_non_ascii_characters_are_rejected(target: str) -> None:
    reject = reject_of("POST", target)
    assert (reject.status, reject.code) == (400, "bad_path")


# ---------------------------------------------------------------------------------------------
# Properties: whatever the target, a matched route names one known upstream file.

UPSTREAM_PREFIXES = ("/v1/", "/analytics.js/v1/", "/analytics-next/bundles/", "/next-integrations/")

_TOKENS = [
    "/",
    ".",
    "..",
    "%",
    "%2e",
    "\\",
    "?",
    "#",
    "@",
    ":",
    "//",
    "http:",
    "v1",
    "t",
    "m",
    "batch",
    "projects",
    "settings",
    KEY,
    "analytics.js",
    "analytics.min.js",
    "analytics-next",
    "bundles",
    "x.bundle.1.js",
    "next-integrations",
    "integrations",
    ".js",
    ".gz",
    "seg",
    "é",
    "\x00",
    " ",
]

targets = st.one_of(
    st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=3)), max_size=14).map("".join),
    st.text(max_size=60),
    st.text(alphabet=st.characters(codec="ascii"), max_size=60).map(lambda t: "/" + t),
)
methods = st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "PUT", "CONNECT", "get"])
prefixes = st.sampled_from(["", "/seg", "/a/b"])


def _segments(path: str) -> list[str]:
    return path.split("/")[1:]


@settings(max_examples=200, deadline=None)
@given(method=methods, target=targets, prefix=prefixes)
def test_any_target_routes_only_to_a_clean_known_upstream_path(
    method: str, target: str, prefix: str
) -> None:
    result = match(method, target, prefix)
    if isinstance(result, Reject):
        assert 400 <= result.status < 500
        if result.status == 405 and method != "CONNECT":
            assert result.allow
        return
    if result.kind in (Kind.HEALTHZ, Kind.READYZ):
        assert result.upstream_path == ""
        return
    path = result.upstream_path
    assert path.startswith(UPSTREAM_PREFIXES)
    assert path.isascii()
    for bad in ("%", "//", "\\", "?", "#", "://", "@", " "):
        assert bad not in path
    # No dot-segment: "a..b.js" is a file name, "/../" would climb out of the directory.
    assert all(seg not in ("", ".", "..") for seg in _segments(path))
    assert all(0x21 <= ord(c) < 0x7F for c in path)


@settings(max_examples=200, deadline=None)
@given(target=targets, prefix=prefixes)
def test_the_request_path_without_its_query_determines_the_route(target: str, prefix: str) -> None:
    """Adding a query string never changes where a request goes."""
    if not target.startswith("/") or "?" in target or "#" in target:
        return
    assert match("GET", target + "?cb=1&x=%2e%2e/..", prefix) == match("GET", target, prefix)


@settings(max_examples=200, deadline=None)
@given(
    name=st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,40}", fullmatch=True),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_any_well_formed_bundle_name_routes_to_that_bundle(name: str, method: str) -> None:
    result = match(method, f"/analytics-next/bundles/{name}.js")
    assert isinstance(result, Route)
    assert result.upstream_path == f"/analytics-next/bundles/{name}.js"
