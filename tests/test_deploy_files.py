"""Deployment files: they parse, and every setting, port, command, probe and object in them is real.

No Docker engine or cluster runs here, so the files are checked as data: Kubernetes objects
against the API's OpenAPI schemas (kubernetes-validate ships them; strict, offline), the CRD
ServiceMonitor and the compose file by their required fields, settings through `load_settings`,
commands through the CLI's own parser, probes against a running gateway, and the image's
entrypoint and start line by running them outside a container.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml

from edgeproxy.cli import build_parser
from edgeproxy.logs.migrate import cluster_ddl
from edgeproxy.logs.store import open_log_store
from edgeproxy.settings import Settings
from edgeproxy.settings_loader import SHORTCUTS, load_settings
from tests.conftest import GatewayFactory, wait_until
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30"
# Set by the image for the interpreter, not for edgeproxy.
RUNTIME_ENV = frozenset({"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"})
# Margin for the final log flush after the drain (a batch to ClickHouse or the spool).
FLUSH_MARGIN_SECONDS = 5
CPU_MAX = "/sys/fs/cgroup/cpu.max"


# --- reading the files -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    heredoc: str = ""


def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[Instruction]:
    """The instructions of a Dockerfile: continuations joined, heredoc bodies attached."""
    lines = path.read_text().splitlines()
    found: list[Instruction] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1].rstrip()
            while lines[i].strip().startswith("#"):
                i += 1
            line += " " + lines[i].strip()
            i += 1
        keyword, _, value = line.partition(" ")
        heredoc = ""
        marker = re.search(r"<<-?'?(\w+)'?", value)
        if marker:
            body: list[str] = []
            while lines[i] != marker.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            heredoc = "\n".join(body) + "\n"
        found.append(Instruction(keyword.upper(), value.strip(), heredoc))
    return found


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1] :]


def image_env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.value):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def exec_form(value: str) -> list[str]:
    """A JSON-array instruction argument (CMD, ENTRYPOINT, HEALTHCHECK … CMD)."""
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), value
    return parsed


def one(stage: list[Instruction], keyword: str) -> Instruction:
    matches = [ins for ins in stage if ins.keyword == keyword]
    assert len(matches) == 1, f"expected one {keyword}, found {len(matches)}"
    return matches[0]


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/k8s, by kind (each kind appears once)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}`: the default, or a sample value when it is empty or absent."""

    def sample(match: re.Match[str]) -> str:
        return match.group(2) or f"sample-{match.group(1).lower()}"

    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", sample, value).replace("$$", "$")


def pod_container(objects: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    containers = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# --- what a container would see ----------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One way the gateway is started: environment, argv and the files mounted into it."""

    name: str
    env: dict[str, str]
    argv: list[str]
    mounts: dict[str, Path]  # container path -> local file

    def local_env(self) -> dict[str, str]:
        """The environment with the config path translated to the local file it mounts."""
        env = dict(self.env)
        if "EDGEPROXY_CONFIG" in env:
            config = env["EDGEPROXY_CONFIG"]
            assert config in self.mounts, f"{self.name}: EDGEPROXY_CONFIG {config} is not a mounted file"
            env["EDGEPROXY_CONFIG"] = str(self.mounts[config])
        return env

    def settings(self) -> Settings:
        """What `edgeproxy <argv>` would run with (the flags as cli.main reads them)."""
        assert self.argv[0] == "edgeproxy", self.argv
        args = build_parser().parse_args(self.argv[1:])
        flags = {
            key: getattr(args, key, None)
            for key in ("config", "host", "port", "workers", "upstream", "data_dir")
        }
        return load_settings(env=self.local_env(), flags=flags)


def image_launch() -> Launch:
    stage = final_stage(dockerfile())
    env = {k: v for k, v in image_env(stage).items() if k not in RUNTIME_ENV}
    return Launch("image", env, exec_form(one(stage, "CMD").value), {})


def compose_launch(tmp_path: Path) -> Launch:
    gateway = compose()["services"]["gateway"]
    env = {**image_launch().env, **{k: interpolate(str(v)) for k, v in gateway["environment"].items()}}
    mounts: dict[str, Path] = {}
    for volume in gateway["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return Launch("compose", env, gateway.get("command") or image_launch().argv, mounts)


def k8s_launch(tmp_path: Path) -> Launch:
    objects = k8s_objects()
    container = pod_container(objects)
    env = dict(image_launch().env)
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "resourceFieldRef" in item["valueFrom"]:
            env[item["name"]] = str(cpus(container["resources"]["limits"]["cpu"]))
        else:
            env[item["name"]] = f"sample-{item['name'].lower()}"
    for source in container.get("envFrom", []):
        assert source["secretRef"]["name"] == objects["Secret"]["metadata"]["name"]
        env.update(objects["Secret"]["stringData"])
    mounts: dict[str, Path] = {}
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        config_map = volumes[mount["name"]].get("configMap")
        if config_map:
            assert config_map["name"] == objects["ConfigMap"]["metadata"]["name"]
            for key, text in objects["ConfigMap"]["data"].items():
                local = tmp_path / key
                local.write_text(text)
                mounts[f"{mount['mountPath']}/{key}"] = local
    return Launch("k8s", env, container["args"], mounts)


def cpus(quantity: str | int) -> int:
    """A Kubernetes CPU quantity rounded up to whole CPUs, as resourceFieldRef with divisor 1 does."""
    text = str(quantity)
    millis = int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)
    return -(-millis // 1000)


def byte_quantity(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def setting_env_names(settings: Settings) -> set[str]:
    """Environment names edgeproxy reads, derived from the Settings dataclasses and the CLI's help."""
    names: set[str] = set()
    hints = typing.get_type_hints(Settings)
    for section in dataclasses.fields(Settings):
        hint = hints[section.name]
        if dataclasses.is_dataclass(hint):
            names |= {f"EDGEPROXY_{section.name.upper()}_{f.name.upper()}" for f in dataclasses.fields(hint)}
        elif typing.get_origin(hint) in (Mapping, dict) and section.name == "targets":
            (value_type,) = typing.get_args(hint)[1:]
            for target in settings.targets:
                prefix = f"EDGEPROXY_TARGETS_{target.upper()}_"
                names |= {prefix + f.name.upper() for f in dataclasses.fields(value_type)}
    names |= {var for var, _section, _field in SHORTCUTS.values()}
    # The flags document their variables: "(env EDGEPROXY_UPSTREAM, …)".
    parser = build_parser()
    for action in _all_actions(parser):
        names |= set(re.findall(r"env (EDGEPROXY_\w+)", action.help or ""))
    return names


def _all_actions(parser: Any) -> Iterator[Any]:
    for action in parser._actions:
        yield action
        for sub in getattr(action, "choices", None) or {}:
            if hasattr(action.choices[sub], "_actions"):
                yield from _all_actions(action.choices[sub])


def launches(tmp_path: Path) -> list[Launch]:
    return [image_launch(), compose_launch(tmp_path), k8s_launch(tmp_path)]


# --- the tests -----------------------------------------------------------------------------


def test_yaml_files_parse() -> None:
    paths = [DEPLOY / "docker-compose.yml", DEPLOY / "prometheus.yml", *sorted(K8S.glob("*.yaml"))]
    assert len(paths) >= 10
    for path in paths:
        docs = yaml_docs(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path


def test_kubernetes_objects_match_their_schemas() -> None:
    objects = k8s_objects()
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    } <= set(objects)
    for kind, obj in objects.items():
        if kind in ("ServiceMonitor", "Kustomization"):
            continue
        # Strict: an unknown or misspelt field fails, as kubectl's server-side validation would.
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert objects["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert objects["PodDisruptionBudget"]["apiVersion"] == "policy/v1"


def test_kubernetes_schema_check_catches_a_misspelt_field() -> None:
    deployment = k8s_objects()["Deployment"]
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGett"] = probe.pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_service_monitor_and_kustomization_structure() -> None:
    """No schema ships for these CRDs, so check the fields the Prometheus Operator and kustomize need."""
    objects = k8s_objects()
    monitor = objects["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) <= {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["name"]
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["spec"]["selector"]["matchLabels"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
    kustomization = objects["Kustomization"]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_labels_and_selectors_line_up() -> None:
    objects = k8s_objects()
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]

    def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(
        objects["ServiceMonitor"]["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]
    )
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # The HPA owns the replica count; a fixed one in the Deployment would fight it on every apply.
    assert "replicas" not in deployment["spec"]
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["minReplicas"] >= 2, "a PDB allowing one disruption needs two replicas to keep serving"


def test_config_files_load_with_every_key_known(tmp_path: Path) -> None:
    configmap = k8s_objects()["ConfigMap"]
    (tmp_path / "configmap.toml").write_text(configmap["data"]["edgeproxy.toml"])
    for path in (DEPLOY / "edgeproxy.toml", tmp_path / "configmap.toml"):
        settings = load_settings(path, env={})  # an unknown key raises SettingsError
        assert tomllib.loads(path.read_text()), path
        assert settings.logs.clickhouse_url and settings.cache.url.startswith("redis://")
        assert settings.ratelimit.url.startswith("redis://")
        assert settings.auth.revocation.startswith("redis://"), "revocations must be shared by the fleet"
        # Opening the store validates the URL's shape; nothing connects.
        open_log_store(settings.logs, tmp_path)


def test_env_vars_are_real_settings(tmp_path: Path) -> None:
    for launch in launches(tmp_path):
        settings = launch.settings()
        valid = setting_env_names(settings)
        for name, value in launch.env.items():
            if name.startswith("EDGEPROXY_"):
                assert name in valid, f"{launch.name}: {name} is not an edgeproxy setting"
                load_settings(env={**launch.local_env(), name: launch.local_env()[name]})
            else:
                # Another program's variable that edgeproxy reads (OPENAI_API_KEY) must change something.
                without = {k: v for k, v in launch.local_env().items() if k != name}
                assert load_settings(env=launch.local_env()) != load_settings(env=without), (
                    f"{launch.name}: {name}={value!r} changes no setting"
                )


def test_env_names_are_derived_not_listed() -> None:
    names = setting_env_names(load_settings(env={}))
    assert {
        "EDGEPROXY_LOGS_CLICKHOUSE_URL",
        "EDGEPROXY_SERVER_DRAIN_SECONDS",
        "EDGEPROXY_CACHE_KEY_PREFIX",
    } <= names
    assert {
        "EDGEPROXY_UPSTREAM",
        "EDGEPROXY_CONFIG",
        "EDGEPROXY_WORKERS",
        "EDGEPROXY_TARGETS_OPENAI_API_KEY",
    } <= names
    assert "EDGEPROXY_LOG_CLICKHOUSE_URL" not in names
    assert "EDGEPROXY_TARGETS_ANTHROPIC_API_KEY" not in names  # no such target configured


def test_secret_env_reaches_the_settings(tmp_path: Path) -> None:
    launch = k8s_launch(tmp_path)
    settings = launch.settings()
    secret = k8s_objects()["Secret"]["stringData"]
    assert settings.targets["openai"].api_key == secret["EDGEPROXY_TARGETS_OPENAI_API_KEY"]
    assert settings.targets["anthropic"].api_key == secret["EDGEPROXY_TARGETS_ANTHROPIC_API_KEY"]
    assert settings.auth.jwt_secret == secret["EDGEPROXY_AUTH_JWT_SECRET"]
    assert settings.logs.password == secret["EDGEPROXY_LOGS_PASSWORD"]
    assert all(value.startswith("REPLACE-ME") for value in secret.values()), (
        "the Secret holds placeholders only"
    )
    assert settings.server.workers == cpus(pod_container(k8s_objects())["resources"]["limits"]["cpu"])


def test_commands_are_cli_commands(tmp_path: Path) -> None:
    parser = build_parser()
    for launch in launches(tmp_path):
        assert launch.argv[0] == "edgeproxy"
        args = parser.parse_args(launch.argv[1:])  # an unknown subcommand or flag exits
        assert args.command == "serve"
        assert args.host == "0.0.0.0", (
            f"{launch.name}: the gateway must listen beyond the container's loopback"
        )
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--no-such-flag"])


def test_ports_match(tmp_path: Path) -> None:
    stage = final_stage(dockerfile())
    exposed = int(one(stage, "EXPOSE").value.split("/")[0])
    image, in_compose, in_k8s = launches(tmp_path)
    assert image.settings().server.port == exposed

    port = in_compose.settings().server.port
    assert port == exposed
    published = compose()["services"]["gateway"]["ports"]
    assert [int(p.split(":")[-1]) for p in published] == [port]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "edgeproxy")
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["gateway"] and sd["port"] == port

    objects = k8s_objects()
    container = pod_container(objects)
    (container_port,) = container["ports"]
    assert container_port["containerPort"] == in_k8s.settings().server.port == exposed
    named = container_port["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in (named, exposed)
    (service_port,) = objects["Service"]["spec"]["ports"]
    assert service_port["targetPort"] in (named, exposed)
    assert {e["port"] for e in objects["ServiceMonitor"]["spec"]["endpoints"]} == {service_port["name"]}


def test_compose_wires_the_stack(tmp_path: Path) -> None:
    spec = compose()
    services = spec["services"]
    assert {"gateway", "clickhouse", "redis", "prometheus", "grafana"} <= set(services)
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
    gateway = services["gateway"]
    assert gateway["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / gateway["build"]["context"]).resolve() == ROOT
    assert {"redis", "clickhouse"} <= set(gateway["depends_on"])
    settings = compose_launch(tmp_path).settings()
    assert settings.logs.clickhouse_url == "http://clickhouse:8123"
    for url in (settings.cache.url, settings.ratelimit.url, settings.auth.revocation):
        assert url.startswith("redis://redis:6379/"), url
    clickhouse_env = {k: interpolate(str(v)) for k, v in services["clickhouse"]["environment"].items()}
    assert settings.logs.user == clickhouse_env["CLICKHOUSE_USER"]
    assert settings.logs.password == clickhouse_env["CLICKHOUSE_PASSWORD"]
    assert settings.logs.database == clickhouse_env["CLICKHOUSE_DB"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            elif not source.startswith("."):
                assert source in spec["volumes"], f"{name}: named volume {source} is not declared"
    # Data volume: where the image keeps its data dir.
    assert f"gateway-data:{settings.server.data_dir}" in gateway["volumes"]


def test_grafana_datasources_name_the_compose_services() -> None:
    services = compose()["services"]
    clickhouse_env = {k: interpolate(str(v)) for k, v in services["clickhouse"]["environment"].items()}
    grafana_env = {k: interpolate(str(v)) for k, v in services["grafana"]["environment"].items()}
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/edgeproxy.yaml").read_text())
    by_type = {d["type"]: d for d in datasources["datasources"]}
    published = {int(p.split(":")[-1]) for p in services["prometheus"]["ports"]}
    assert by_type["prometheus"]["url"] in {f"http://prometheus:{port}" for port in published}
    clickhouse = by_type["grafana-clickhouse-datasource"]["jsonData"]
    assert (clickhouse["host"], clickhouse["port"]) == ("clickhouse", 8123)
    assert clickhouse["username"] == clickhouse_env["CLICKHOUSE_USER"]
    assert clickhouse["defaultDatabase"] == clickhouse_env["CLICKHOUSE_DB"]
    assert "grafana-clickhouse-datasource" in grafana_env["GF_INSTALL_PLUGINS"].split(",")
    password = by_type["grafana-clickhouse-datasource"]["secureJsonData"]["password"]
    assert (
        password.startswith("$")
        and grafana_env[password.lstrip("${").rstrip("}")] == clickhouse_env["CLICKHOUSE_PASSWORD"]
    )
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/edgeproxy.yaml").read_text())
    paths = {p["options"]["path"] for p in provider["providers"]}
    assert paths == {"/var/lib/grafana/dashboards"}, "the compose file mounts the dashboards there"


def test_shutdown_fits_the_grace_periods(tmp_path: Path) -> None:
    deployment = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    container = pod_container(k8s_objects())
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = k8s_launch(tmp_path).settings().server.drain_seconds
    assert pre_stop > 0, "the endpoint must be removed before SIGTERM"
    assert deployment["terminationGracePeriodSeconds"] >= pre_stop + drain + FLUSH_MARGIN_SECONDS

    grace = compose()["services"]["gateway"]["stop_grace_period"]
    assert grace.endswith("s")
    assert (
        float(grace[:-1]) >= compose_launch(tmp_path).settings().server.drain_seconds + FLUSH_MARGIN_SECONDS
    )


def test_resources_and_spool_fit(tmp_path: Path) -> None:
    objects = k8s_objects()
    container = pod_container(objects)
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind])
    settings = k8s_launch(tmp_path).settings()
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    data = volumes[mounts[settings.server.data_dir]]
    # Each worker process keeps its own spool budget, so the volume must hold all of them.
    assert (
        byte_quantity(data["emptyDir"]["sizeLimit"])
        >= settings.server.workers * settings.logs.spool_max_bytes
    )
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = set(mounts) - {m["mountPath"] for m in container["volumeMounts"] if m.get("readOnly")}
    assert {settings.server.data_dir, "/tmp"} <= writable


def test_dockerfile_is_slim_pinned_and_non_root() -> None:
    instructions = dockerfile()
    for base in (ins.value.split()[0] for ins in instructions if ins.keyword == "FROM"):
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), (
            f"pin a slim 3.11 patch release, got {base}"
        )
    stage = final_stage(instructions)
    user = [ins.value for ins in stage if ins.keyword == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user, so runAsNonRoot can verify it"
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(uid)
    data_dir = image_env(stage)["EDGEPROXY_DATA_DIR"]
    assert exec_form(one(stage, "VOLUME").value) == [data_dir]
    healthcheck = one(stage, "HEALTHCHECK").value
    assert "/healthz" in healthcheck
    assert exec_form(one(stage, "ENTRYPOINT").value) == ["edgeproxy-entrypoint"]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    copied = []
    for ins in dockerfile():
        if ins.keyword == "COPY" and not ins.heredoc and "--from=" not in ins.value:
            copied += shlex.split(ins.value)[:-1]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), f"{source} is copied but .dockerignore drops it"
        for inner in (ROOT / source).rglob("*.py") if (ROOT / source).is_dir() else ():
            assert not ignored(str(inner.relative_to(ROOT)), patterns), inner
    for kept_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "edgeproxy/__pycache__/app.cpython-311.pyc",
    ):
        assert ignored(kept_out, patterns), kept_out


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            verdict = not negated
    return verdict


def entrypoint_script() -> str:
    stage = final_stage(dockerfile())
    (copy,) = [ins for ins in stage if ins.keyword == "COPY" and ins.heredoc]
    assert copy.value.split()[-1] == "/usr/local/bin/edgeproxy-entrypoint"
    assert "--chmod=0755" in copy.value
    return copy.heredoc


def run_entrypoint(tmp_path: Path, cpu_max: str | None, **env: str) -> dict[str, str]:
    """Run the image's entrypoint with `env` as its command; return the environment it passed on."""
    script = entrypoint_script()
    assert script.count(CPU_MAX) == 1
    cpu_file = tmp_path / "cpu.max"
    if cpu_max is None:
        cpu_file.unlink(missing_ok=True)
    else:
        cpu_file.write_text(cpu_max + "\n")
    path = tmp_path / "entrypoint"
    path.write_text(script.replace(CPU_MAX, str(cpu_file)))
    base = {k: v for k, v in os.environ.items() if k != "EDGEPROXY_WORKERS"}
    done = subprocess.run(
        ["sh", str(path), "env"], check=False, env={**base, **env}, capture_output=True, text=True, timeout=10
    )
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def test_entrypoint_defaults_workers_to_the_containers_cpus(tmp_path: Path) -> None:
    nproc = len(os.sched_getaffinity(0))
    assert run_entrypoint(tmp_path, None)["EDGEPROXY_WORKERS"] == str(nproc)
    assert run_entrypoint(tmp_path, "max 100000")["EDGEPROXY_WORKERS"] == str(nproc)
    # --cpus=1.5 rounds up to 2; a quota below one CPU still gets one worker.
    assert run_entrypoint(tmp_path, "150000 100000")["EDGEPROXY_WORKERS"] == str(min(nproc, 2))
    assert run_entrypoint(tmp_path, "50000 100000")["EDGEPROXY_WORKERS"] == "1"
    assert run_entrypoint(tmp_path, "6400000 100000")["EDGEPROXY_WORKERS"] == str(nproc)
    assert run_entrypoint(tmp_path, "150000 100000", EDGEPROXY_WORKERS="5")["EDGEPROXY_WORKERS"] == "5"


async def test_probes_and_scrape_paths_answer(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    gateway = await start_gateway()
    container = pod_container(k8s_objects())
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths |= {e["path"] for e in k8s_objects()["ServiceMonitor"]["spec"]["endpoints"]}
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    paths |= {j["metrics_path"] for j in scrape["scrape_configs"] if j["job_name"] == "edgeproxy"}
    assert paths == {"/healthz", "/readyz", "/metrics"}
    async with aiohttp.ClientSession() as session:
        for path in sorted(paths):
            async with session.get(gateway.url + path) as response:
                assert response.status == 200, path
        async with session.get(gateway.url + "/no-such-probe") as response:
            assert response.status == 404

    # The image's HEALTHCHECK command, run as the container would (python is our interpreter).
    stage = final_stage(dockerfile())
    check = exec_form(one(stage, "HEALTHCHECK").value.split(" CMD ", 1)[1])
    assert check[0] == "python"
    port = gateway.url.rsplit(":", 1)[1]
    for env_port, expected in ((port, 0), (str(free_port()), 1)):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *check[1:],
            env={**os.environ, "EDGEPROXY_PORT": env_port},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert await asyncio.wait_for(process.wait(), 10) == expected


async def test_image_start_line_serves(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD with the image's environment, outside a container: workers start and answer."""
    stage = final_stage(dockerfile())
    entrypoint = tmp_path / "edgeproxy-entrypoint"
    entrypoint.write_text(entrypoint_script())
    argv = exec_form(one(stage, "CMD").value)
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEPROXY_", "PROMETHEUS_"))}
    env = {
        **base,
        **{k: v for k, v in image_env(stage).items() if k not in RUNTIME_ENV},
        "EDGEPROXY_DATA_DIR": str(tmp_path / "data"),
        "EDGEPROXY_PORT": str(port),
        "EDGEPROXY_LOGS_ENABLED": "false",
        "EDGEPROXY_SERVER_DRAIN_SECONDS": "2",
    }
    command = [sys.executable, "-m", "edgeproxy", *argv[1:]]
    process = await asyncio.create_subprocess_exec(
        "sh", str(entrypoint), *command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                assert process.returncode is None, "the gateway exited at start"
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(ready, timeout=30, interval=0.05)
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_readme_documents_the_cluster_layout() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "edgeproxy migrate --cluster" in readme
    match = re.search(r"^-- edgeproxy request log for cluster (\w+);", readme, re.MULTILINE)
    assert match, "the README holds the DDL `edgeproxy migrate --cluster NAME` prints"
    settings = load_settings(DEPLOY / "edgeproxy.toml", env={})
    ddl = cluster_ddl(settings.logs, match.group(1))
    assert ddl.strip() in readme, (
        "the README's DDL is stale: paste `edgeproxy migrate --cluster` output again"
    )
    assert "ReplicatedReplacingMergeTree" in ddl and "Distributed(" in ddl
