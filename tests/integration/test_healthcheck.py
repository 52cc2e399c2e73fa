"""`python -m segproxy.healthcheck`, the container's HEALTHCHECK and an exec probe: exit 0 only
when the proxy described by the same configuration answers /readyz 200."""

from __future__ import annotations

from tests.integration.conftest import StartProxy, base_config
from tests.integration.test_admin import TOKEN, admin_port
from tests.support.fakes import FakeSegment
from tests.support.proxy import RunningProxy, run_cli


def healthcheck(**env: str) -> tuple[int, str]:
    done = run_cli(env=env, module="segproxy.healthcheck")
    return done.returncode, done.stderr


def test_the_healthcheck_passes_on_a_ready_proxy(proxy: RunningProxy) -> None:
    # Bound to every address, as in the image: the check asks on loopback.
    assert healthcheck(SEGPROXY_LISTEN=f"0.0.0.0:{proxy.port}") == (0, "")


def test_the_healthcheck_fails_when_nothing_answers(proxy: RunningProxy) -> None:
    proxy.stop()
    code, said = healthcheck(SEGPROXY_LISTEN=f"127.0.0.1:{proxy.port}")
    assert code == 1
    assert "no answer from /readyz" in said


def test_the_healthcheck_asks_the_operator_listener_with_the_token(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, admin={"listen": "127.0.0.1:0", "token": TOKEN}))
    env = {
        "SEGPROXY_LISTEN": proxy.authority,
        "SEGPROXY_ADMIN_LISTEN": f"0.0.0.0:{admin_port(proxy)}",
    }
    assert healthcheck(**env, SEGPROXY_ADMIN_TOKEN=TOKEN) == (0, "")
    code, said = healthcheck(**env, SEGPROXY_ADMIN_TOKEN="another-token-of-enough-length")
    assert code == 1
    assert "/readyz answered 401" in said
    assert TOKEN not in said


def test_the_healthcheck_names_a_bad_setting_instead_of_probing(proxy: RunningProxy) -> None:
    code, said = healthcheck(SEGPROXY_LISTEN="nowhere")
    assert code == 1
    assert "SEGPROXY_LISTEN" in said
