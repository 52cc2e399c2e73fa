"""deploy/kubernetes/: valid against Kubernetes' own OpenAPI schemas (offline: the schemas ship
with kubernetes-validate), and consistent with segproxy: probes on real paths and the ports the
configuration listens on, one pod per queue disk, a drain that is not cut short."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from segproxy.config import Config, load
from segproxy.config.schema import LimitsConfig
from segproxy.routes import Kind, match

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes still supported by its cloud vendors' extended support, and the newest
# whose schemas kubernetes-validate ships.
VERSIONS = ("1.28.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


def one(kind: str) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    return found[0]


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def configuration() -> Config:
    """What segproxy reads in the pod: the container's environment, as `segproxy serve` does."""
    return load(None, {e["name"]: e["value"] for e in container()["env"]})


def port_number(port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container()["ports"]}
    return int(named[port])


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    kinds = set()
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)  # strict: no unknown fields
        kinds.add(doc["kind"])
    assert kinds == {"Deployment", "Service", "PersistentVolumeClaim"}


def test_the_schema_check_finds_a_misspelled_field() -> None:
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_probes_ask_segproxys_own_health_paths_on_the_listeners_that_serve_them() -> None:
    config = configuration()
    c = container()
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert match("GET", ready["path"], "").kind is Kind.READYZ  # type: ignore[union-attr]
    assert match("GET", live["path"], "").kind is Kind.HEALTHZ  # type: ignore[union-attr]
    # /readyz is an operator endpoint: on admin.listen when it is set; /healthz on the main one.
    assert config.admin.listen is not None
    assert port_number(ready["port"]) == config.admin.listen[1]
    assert port_number(live["port"]) == config.listen_port
    assert not config.admin.token  # a probe's httpGet cannot send a token from a Secret


def test_the_service_sends_traffic_to_the_main_listener_only() -> None:
    config = configuration()
    service = one("Service")
    assert service["spec"]["selector"] == one("Deployment")["spec"]["selector"]["matchLabels"]
    targets = [port_number(p["targetPort"]) for p in service["spec"]["ports"]]
    assert targets == [config.listen_port]  # not the operator port
    assert config.listen_host == "0.0.0.0"


def test_one_pod_writes_the_queue_on_its_disk() -> None:
    deployment, claim = one("Deployment"), one("PersistentVolumeClaim")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two during a rollout
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    config = configuration()
    data = volumes[mounts[config.data_dir]]
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert Path(config.queue.path).parent == Path(config.data_dir)
    assert config.queue.backend == "sqlite"


def test_termination_leaves_time_for_the_prestop_pause_and_the_drain() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    pause = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    drain = 2 * configuration().limits.shutdown_grace  # requests, then the forwarder
    assert spec["terminationGracePeriodSeconds"] > int(pause[1]) + drain
    assert configuration().limits.shutdown_grace == LimitsConfig().shutdown_grace


def test_the_pod_runs_as_a_non_root_user_on_a_read_only_root() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    pod, own = spec["securityContext"], container()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["runAsUser"] == 10001  # the Dockerfile's segproxy user: it owns the data dir
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]
    assert spec["enableServiceLinks"] is False  # else SEGPROXY_PORT & co. warn at every start
