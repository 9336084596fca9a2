"""The Kubernetes manifests in deploy/kubernetes/: valid for the API server, and consistent with
the laneswitch config they carry and the image they run.

No cluster runs here. Every manifest is validated offline against the Kubernetes OpenAPI schemas
bundled in the `kubernetes-validate` package (strict: unknown fields are errors, as
`kubectl apply --validate=strict` makes them), for the oldest and newest minor versions we
claim. What a schema cannot see is checked by hand below: the ConfigMap's config passes
`laneswitch check`, the ports and probes point at what the config listens on, and the
termination timings let a drain finish.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from proxy.config.loader import parse_config
from proxy.config.model import Config
from proxy.config.scalars import parse_endpoint
from tests.e2e.test_deploy_docker import exec_form, instructions
from tests.helpers import ROOT, laneswitch_command

KUBE = ROOT / "deploy" / "kubernetes"
# The Kubernetes versions the manifests are written for: the oldest still common and the newest
# whose schemas the validator bundles.
KUBE_VERSIONS = ["1.29.0", "1.37.0"]
TOKEN_REF = "${LANESWITCH_ADMIN_TOKEN}"


def manifest_files() -> list[Path]:
    files = sorted([*KUBE.rglob("*.yaml"), *KUBE.rglob("*.yml")])
    assert files, "no manifests under deploy/kubernetes"
    return files


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in documents(path):
            yield path, doc


def find(kind: str, name: str) -> dict[str, Any]:
    for _, doc in all_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/kubernetes")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBE)))
def test_manifest_is_valid_for_kubernetes(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no manifest"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {where}: {exc}")


def test_the_validator_rejects_what_the_api_server_would() -> None:
    """The check above is not vacuous: a typo and a wrong type are caught."""
    deployment = find("Deployment", "laneswitch")
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------------------------
# The embedded configs
# --------------------------------------------------------------------------------------------


def embedded_configs() -> list[tuple[str, str]]:
    found = [
        (f"{doc['metadata']['name']}/{key}", text)
        for _, doc in all_documents()
        if doc["kind"] == "ConfigMap"
        for key, text in doc.get("data", {}).items()
        if key.endswith((".yaml", ".yml"))
    ]
    assert len(found) >= 2, found
    return found


@pytest.mark.parametrize(
    ("name", "text"), [pytest.param(name, text, id=name) for name, text in embedded_configs()]
)
async def test_configmap_config_passes_laneswitch_check(
    name: str, text: str, tmp_path: Path
) -> None:
    path = tmp_path / "laneswitch.yaml"
    path.write_text(text)
    # In the pod the token comes from the Secret and the pod's name from the downward API;
    # `check` gets what the pod's environment would hold.
    env = {**os.environ, **pod_env(mounting(name.split("/")[0]))}
    process = await asyncio.create_subprocess_exec(
        *laneswitch_command(),
        "check",
        "-c",
        str(path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, f"{name}:\n{err.decode()}"
    assert b"valid" in out
    # The token is a reference to the environment, never a literal in a ConfigMap.
    assert yaml.safe_load(text)["admin"]["token"] == TOKEN_REF


# --------------------------------------------------------------------------------------------
# What the schemas cannot see
# --------------------------------------------------------------------------------------------


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


# What the downward API gives `metadata.name` in these checks: a pod name as a ReplicaSet makes it.
POD_NAME = "laneswitch-6d4cf56db6-x7k2p"


def pod_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The environment of the laneswitch container as the pod would have it: literal values,
    the pod's name from the downward API, a stand-in for each Secret."""
    env: dict[str, str] = {}
    for entry in container(deployment, "laneswitch").get("env", []):
        source = entry.get("valueFrom", {})
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[entry["name"]] = POD_NAME
        elif "secretKeyRef" in source:
            env[entry["name"]] = "from-the-secret"
    return env


def mounting(config_map: str) -> dict[str, Any]:
    """The Deployment that mounts the ConfigMap `config_map`."""
    for _, doc in all_documents():
        if doc["kind"] != "Deployment":
            continue
        for volume in doc["spec"]["template"]["spec"].get("volumes", []):
            if volume.get("configMap", {}).get("name") == config_map:
                return doc
    raise AssertionError(f"no Deployment mounts the ConfigMap {config_map}")


def pod_config(deployment: dict[str, Any], laneswitch: dict[str, Any]) -> tuple[str, Config]:
    """The config file path laneswitch runs with in this pod, and the parsed config it finds."""
    args = laneswitch.get("args") or exec_form(
        next(a for k, a in instructions((ROOT / "Dockerfile").read_text()) if k == "CMD")
    )
    assert "command" not in laneswitch, "keep the image's ENTRYPOINT"
    path = args[args.index("-c") + 1]
    mount = next(
        m for m in laneswitch["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")
    )
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    volume = next(
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    config_map = find("ConfigMap", volume["configMap"]["name"])
    key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    for item in volume["configMap"].get("items", []):
        if item["path"] == key:
            key = item["key"]
    text = config_map["data"][key]
    return path, parse_config(text, env=pod_env(deployment))


def port_number(spec: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in spec["ports"] if p["name"] == port))


def prestop_sleep(spec: dict[str, Any]) -> float:
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def image_uid() -> int:
    steps = instructions((ROOT / "Dockerfile").read_text())
    return int(next(a for k, a in reversed(steps) if k == "USER").split(":")[0])


def check_laneswitch_container(deployment: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    spec = container(deployment, "laneswitch")
    _, config = pod_config(deployment, spec)
    # Ports: the container's named ports are the ones the config listens on.
    assert port_number(spec, "http") == parse_endpoint(config.listen[0])[1]
    admin_host, admin_port = parse_endpoint(config.admin.listen)
    assert port_number(spec, "admin") == admin_port
    assert admin_host == "0.0.0.0", "the kubelet probes the pod IP"
    # Probes on the admin API.
    ready, live = spec["readinessProbe"]["httpGet"], spec["livenessProbe"]["httpGet"]
    assert (ready["path"], port_number(spec, ready["port"])) == ("/readyz", admin_port)
    assert (live["path"], port_number(spec, live["port"])) == ("/healthz", admin_port)
    # The token from a Secret, under the name the config refers to.
    env = {e["name"]: e for e in spec["env"]}
    assert "secretKeyRef" in env["LANESWITCH_ADMIN_TOKEN"]["valueFrom"]
    # Termination: preStop sleep, then SIGTERM and a drain of at most drain_timeout (+1 s to exit).
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > prestop_sleep(spec) + config.drain_timeout + 1
    # Security: non-root (the image's uid), read-only root filesystem, nothing to escalate.
    security = {**pod.get("securityContext", {}), **spec.get("securityContext", {})}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == image_uid()
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # With a read-only root filesystem, the state file must be on a volume.
    if config.state_file is not None:
        assert any(
            config.state_file.startswith(m["mountPath"].rstrip("/") + "/")
            and not m.get("readOnly", False)
            for m in spec["volumeMounts"]
        ), "state_file is not on a writable volume"
    return config, spec


def check_service_targets(service: dict[str, Any], deployment: dict[str, Any]) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    names = {
        p["name"]
        for c in deployment["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in names, port


def test_ingress_deployment() -> None:
    deployment = find("Deployment", "laneswitch")
    assert deployment["spec"]["replicas"] == 2
    config, _ = check_laneswitch_container(deployment)
    assert config.admin.metrics_public is False
    check_service_targets(find("Service", "laneswitch"), deployment)
    check_service_targets(find("Service", "laneswitch-admin"), deployment)
    budget = find("PodDisruptionBudget", "laneswitch")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_sidecar_deployment() -> None:
    deployment = find("Deployment", "shop")
    config, proxy = check_laneswitch_container(deployment)
    app = container(deployment, "app")
    # The app listens on loopback only, where the config sends the local version's traffic.
    app_env = {e["name"]: e.get("value") for e in app.get("env", [])}
    assert app_env["LISTEN"] in config.services["shop"].versions["local"].endpoints
    assert parse_endpoint(app_env["LISTEN"])[0] == "127.0.0.1"
    assert "ports" not in app, "the app is reached through laneswitch only"
    # The app outlives laneswitch's drain, which still needs it.
    assert prestop_sleep(app) >= prestop_sleep(proxy) + config.drain_timeout + 1
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > prestop_sleep(app)
    check_service_targets(find("Service", "shop"), deployment)
    check_service_targets(find("Service", "shop-canary"), find("Deployment", "shop-canary"))
    canary_port = find("Service", "shop-canary")["spec"]["ports"][0]["port"]
    assert f"shop-canary:{canary_port}" in config.services["shop"].versions["canary"].endpoints


def test_the_ingress_and_the_sidecars_each_form_a_fleet_on_the_example_redis() -> None:
    redis_service = find("Service", "laneswitch-redis")
    redis = find("Deployment", "laneswitch-redis")
    check_service_targets(redis_service, redis)
    names = []
    for deployment in (find("Deployment", "laneswitch"), find("Deployment", "shop")):
        spec = container(deployment, "laneswitch")
        _, config = pod_config(deployment, spec)
        fleet = config.fleet
        assert fleet is not None, deployment["metadata"]["name"]
        names.append(fleet.name)
        # The member id is the pod's name (downward API), through `${POD_NAME:-}`.
        env = {e["name"]: e for e in spec["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert fleet.member == POD_NAME
        # The store is the example Redis's Service, on its port.
        url = urlsplit(fleet.redis)
        assert (url.scheme, url.hostname) == ("redis", redis_service["metadata"]["name"])
        assert url.port == redis_service["spec"]["ports"][0]["port"]
        # Renewals (every 0.15 x lease) and the SIGTERM drain fit the pod's timings: a
        # stopping leader hands the lease over on exit, well inside the grace period.
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert fleet.lease < grace
        # Each pod labelled as these are may reach the Redis (its NetworkPolicy).
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        policy = find("NetworkPolicy", "laneswitch-redis")
        allowed = [
            rule["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"][0]["from"]
        ]
        assert any(selector.items() <= labels.items() for selector in allowed), labels
    assert len(set(names)) == 2, names  # two fleets, each under its own keys in one Redis
    # The Redis pod the policy guards, and the port it opens.
    policy = find("NetworkPolicy", "laneswitch-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    redis_container = container(redis, "redis")
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] in {
        p["name"] for p in redis_container["ports"]
    }
    # For trying it: no persistence (an empty Redis is re-seeded by the members), one at a
    # time, non-root, read-only root filesystem with its data directory on a volume.
    args = redis_container["args"]
    assert args[args.index("--save") + 1] == "" and "--appendonly" in args
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["strategy"]["type"] == "Recreate"
    pod = redis["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert redis_container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/data" for m in redis_container["volumeMounts"])
    comment = (KUBE / "redis" / "redis.yaml").read_text()
    assert "managed Redis or one behind Sentinel" in comment
    deploying = (ROOT / "docs" / "deploying.md").read_text()
    assert "kubectl apply -f deploy/kubernetes/redis/" in deploying


def test_the_deploying_doc_names_the_secret_the_manifests_use() -> None:
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for _, doc in all_documents()
        if doc["kind"] == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    deploying = (ROOT / "docs" / "deploying.md").read_text()
    for name in refs:
        assert f"kubectl create secret generic {shlex.quote(name)}" in deploying
