"""The Kubernetes deployment files (deploy/kubernetes/) validate offline against the Kubernetes
API schemas (kubernetes-validate bundles them), and agree with the proxy they deploy: its own
config parser accepts the ConfigMap's file with the Deployment's arguments, the probes and the
scrape annotations use the admin port of that file, the Service and the PodDisruptionBudget
select the pods, the image tag is the package version, and the termination grace period covers
the preStop hook plus the drain."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from amqproxy.config import parse_config
from amqproxy.server import SHUTDOWN_GRACE

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes release still maintained when these files were written, and the newest
# the validator knows.
VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


def resources() -> dict[str, dict]:
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[doc["kind"]] = doc
    return found


def test_the_files_are_there():
    assert {p.name for p in MANIFESTS} >= {
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "poddisruptionbudget.yaml",
    }
    assert set(resources()) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_every_manifest_validates_strictly(path, version):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_a_broken_manifest():
    """The schemas are really consulted (offline): an unknown field and a wrong type fail."""
    deployment = resources()["Deployment"]
    unknown = copy.deepcopy(deployment)
    unknown["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, VERSIONS[-1], strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSIONS[-1], strict=True)


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _config(tmp_path):
    """The proxy's Config from the ConfigMap's file and the Deployment's arguments."""
    found = resources()
    container = _container(found["Deployment"])
    (mount,) = container["volumeMounts"]
    ((name, text),) = found["ConfigMap"]["data"].items()
    args = list(container["args"])
    config_path = args[args.index("--config") + 1]
    assert config_path == f"{mount['mountPath']}/{name}"
    local = tmp_path / name
    local.write_text(text)
    local.chmod(0o640)
    args[args.index("--config") + 1] = str(local)
    return parse_config(args, env={})


def test_the_proxy_accepts_the_configuration(tmp_path):
    config = _config(tmp_path)
    assert len(config.upstream) == 3, "every node of the RabbitMQ cluster"
    assert config.upstream_failure == "recover"


def test_ports_probes_and_scrape_annotations_match_the_configuration(tmp_path):
    config = _config(tmp_path)
    deployment = resources()["Deployment"]
    container = _container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.listen == ("0.0.0.0", ports["amqp"])
    assert config.http_listen == ("0.0.0.0", ports["admin"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ports["admin"]),
        "prometheus.io/path": "/metrics",
    }


def test_the_grace_period_covers_the_pre_stop_hook_and_the_drain(tmp_path):
    config = _config(tmp_path)
    spec = resources()["Deployment"]["spec"]["template"]["spec"]
    command = _container(resources()["Deployment"])["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    # After SIGTERM: the shutdown delay, the drain, then up to SHUTDOWN_GRACE + 1 s for the
    # remaining clients' Close-Ok and SHUTDOWN_GRACE for the upstreams' (server.Proxy._stop).
    needed = pre_stop + config.shutdown_delay + config.drain_timeout + 2 * SHUTDOWN_GRACE + 1
    assert needed < spec["terminationGracePeriodSeconds"], (needed, spec["terminationGracePeriodSeconds"])
    # The readiness probe notices a draining pod (503) well within the preStop hook.
    probe = _container(resources()["Deployment"])["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] <= pre_stop


def test_service_and_budget_select_the_pods():
    found = resources()
    labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert found["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found["Service"]["spec"]["selector"].items() <= labels.items()
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in _container(found["Deployment"])["ports"]}
    assert {p["targetPort"] for p in found["Service"]["spec"]["ports"]} <= port_names
    assert found["PodDisruptionBudget"]["spec"]["maxUnavailable"] < found["Deployment"]["spec"]["replicas"]


def test_the_image_is_the_one_the_dockerfile_builds():
    version = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    image = _container(resources()["Deployment"])["image"]
    assert image == f"amqproxy:{version}"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"-t {image} ." in dockerfile
    assert 'ENTRYPOINT ["amqproxy"]' in dockerfile
    assert "USER 10001:10001" in dockerfile
    assert resources()["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
