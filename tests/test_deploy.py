"""deploy/ and docs/DEPLOY.md, checked without a container engine, systemd or Kubernetes.

Every command line they contain (a unit's ExecStart, a container's args, a
shell line of the walkthrough) goes through the real CLI's own parsers —
argparse for ``meta serve``, ``node serve`` and ``mount``, click for the rest
— with the TOML it names, so a flag that does not exist, a bad value or a
``--node-index`` past the ``[[nodes]]`` entries fails here. The Kubernetes
manifests get a structural check (no kubeconform in the package registries):
known field names, selectors against labels, mounts against volumes, ports
against names.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from deepfs.config import ClusterConfig, load_cluster_config
from deepfs.errors import ConfigError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"
INSTALLED_DEEPFS = "/opt/deepfs/bin/deepfs"  # where the Containerfile and the walkthrough install it
ETC_TOML = "/etc/deepfs/cluster.toml"


# ----------------------------------------------------------------- the real CLI
def check_command_line(args: list[str], toml_file: Path) -> None:
    """Parse ``deepfs ARGS`` as the CLI would, with ``toml_file`` standing in for /etc/deepfs/cluster.toml.

    Raises (SystemExit from argparse, click.UsageError, ConfigError) when the CLI would refuse it."""
    args = [str(toml_file) if a == ETC_TOML else a for a in args]
    if args[:2] == ["meta", "serve"]:
        from metadata.server import build_parser, config_from_args

        config_from_args(build_parser().parse_args(args[2:]))
    elif args[:2] == ["node", "serve"]:
        from storage_node.server import parse_args

        parse_args(args[2:])
    elif args[:1] == ["mount"]:
        from fuse_client.options import parse_args as parse_mount_args

        parse_mount_args(args[1:])
    else:
        from deepfs_cli.main import main

        command: click.Command = main
        while isinstance(command, click.Group) and args and args[0] in command.commands:
            command, args = command.commands[args[0]], args[1:]
        assert command is not main, f"not a deepfs command: {args}"
        command.make_context(command.name or "deepfs", list(args))


def test_checker_refuses_what_the_cli_refuses(tmp_path: Path) -> None:
    toml_file = write_toml(tmp_path, walkthrough_toml_text())
    check_command_line(["node", "serve", "--config", ETC_TOML, "--node-index", "5"], toml_file)
    for bad in (["node", "serve", "--config", ETC_TOML, "--no-such-flag"],
                ["node", "serve", "--config", ETC_TOML, "--node-index", "6"],
                ["meta", "serve", "--config", ETC_TOML, "--k", "0"],
                ["mount", "--foreground", "host:7700"],
                ["node", "drain", "--grpc", "h:7701"]):
        with pytest.raises((SystemExit, click.UsageError, ConfigError)):
            check_command_line(bad, toml_file)


def test_server_help_through_the_deepfs_script() -> None:
    """The pass-through commands the units and manifests use exist in the installed script."""
    from click.testing import CliRunner

    from deepfs_cli.main import main

    for args, expected in ((["meta", "serve", "--help-server"], "--config"),
                           (["node", "serve", "--help-server"], "--node-index"), (["mount", "--help"], "MOUNTPOINT")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and expected in result.output, (args, result.output)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------- docs/DEPLOY.md
def walkthrough_toml_text() -> str:
    blocks = re.findall(r"```toml\n(.*?)```", DEPLOY_DOC.read_text(), re.S)
    assert len(blocks) == 1, "docs/DEPLOY.md has one cluster TOML"
    return blocks[0]


def walkthrough_config(tmp_path: Path) -> ClusterConfig:
    return load_cluster_config(write_toml(tmp_path, walkthrough_toml_text()))


def test_walkthrough_toml_is_one_meta_six_nodes_on_their_own_hosts(tmp_path: Path) -> None:
    config = walkthrough_config(tmp_path)
    assert len(config.nodes) == 6
    hosts = [config.meta.host, *(node.host for node in config.nodes)]
    assert len(set(hosts)) == len(hosts) and "127.0.0.1" not in hosts
    meta_grpc = f"{config.meta.host}:{config.meta.grpc_port}"
    assert all(node.meta_grpc == meta_grpc for node in config.nodes)
    assert config.client.meta_address == f"{config.meta.host}:{config.meta.port}"
    assert config.meta.default_k + config.meta.default_m <= len({n.failure_domain for n in config.nodes}) * 2


def walkthrough_shell_commands() -> Iterator[list[str]]:
    for block in re.findall(r"```sh\n(.*?)```", DEPLOY_DOC.read_text(), re.S):
        for line in block.splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                words = shlex.split(part)
                if words and words[0] in ("deepfs", INSTALLED_DEEPFS):
                    yield words[1:]


def test_walkthrough_commands_are_accepted_by_the_cli(tmp_path: Path) -> None:
    toml_file = write_toml(tmp_path, walkthrough_toml_text())
    commands = list(walkthrough_shell_commands())
    assert {c[0] for c in commands} >= {"mount", "status", "fsck", "node"}
    for args in commands:
        check_command_line(args, toml_file)


# ------------------------------------------------------------------ Containerfile
def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Containerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    assert not pending, "a continuation line runs off the end"
    return instructions


def apt_installed(arguments: str) -> set[str]:
    words = arguments.replace("&&", " ").split()
    if "install" not in words:
        return set()
    return {w for w in words[words.index("install") + 1:] if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", w)}


def test_containerfile_builds_the_project_on_debian_12() -> None:
    instructions = containerfile_instructions()
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "ENTRYPOINT", "CMD", "EXPOSE", "VOLUME",
             "USER", "LABEL", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "ONBUILD"}
    assert {keyword for keyword, _ in instructions} <= known
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert stages and all(re.match(r"debian:12(\b|-)", stage) for stage in stages), stages
    stage_names = {stage.split()[-1] for stage in stages if " AS " in stage.upper()}

    # Every COPY from the build context names something in the repository, and together they hold
    # every package pyproject.toml installs.
    copied: set[str] = set()
    for keyword, args in instructions:
        if keyword != "COPY":
            continue
        words = args.split()
        if words[0].startswith("--from="):
            assert words[0].removeprefix("--from=") in stage_names
            continue
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            copied.add(source)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.split(".")[0].rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied

    # The entrypoint is the console script pyproject.toml defines, installed by this file.
    entrypoint = json.loads(next(args for keyword, args in instructions if keyword == "ENTRYPOINT"))
    assert entrypoint == [INSTALLED_DEEPFS]
    assert Path(INSTALLED_DEEPFS).name in pyproject["project"]["scripts"]
    assert any(keyword == "RUN" and "venv /opt/deepfs" in args for keyword, args in instructions)
    # pyfuse3 with DeepFS's patch goes in before the project (which would pull upstream's).
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    patched = next(i for i, args in enumerate(runs) if "third_party/pyfuse3/install.py" in args)
    project = next(i for i, args in enumerate(runs) if re.search(r"pip install .*\.(\s|$)", args))
    assert patched < project

    # The runtime stage (after the last FROM) has what the Makefile installs for running: fuse3.
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    runtime = set().union(*(apt_installed(args) for keyword, args in instructions[last_from:] if keyword == "RUN"))
    makefile = (ROOT / "Makefile").read_text()
    apt_packages = re.search(r"^APT_PACKAGES := (.*)$", makefile, re.M)
    assert apt_packages and "fuse3" in apt_packages.group(1).split()
    assert {"fuse3", "python3"} <= runtime
    build = set().union(*(apt_installed(args) for keyword, args in instructions[:last_from] if keyword == "RUN"))
    assert {"libfuse3-dev", "pkg-config"} <= build  # pyfuse3 compiles against them, as `make deps` provides


def test_containerfile_ignore_keeps_the_virtualenv_out() -> None:
    ignored = (DEPLOY / "Containerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ----------------------------------------------------------------------- systemd
def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as section -> [(key, value)]: systemd repeats keys (After=), which configparser refuses."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None and "=" in line, f"{path.name}: {raw!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) for v in v.split() if k == key]


def exec_start(unit: dict[str, list[tuple[str, str]]], specifiers: dict[str, str]) -> list[str]:
    (line,) = [v for k, v in unit["Service"] if k == "ExecStart"]
    for specifier, value in specifiers.items():
        line = line.replace(specifier, value)
    return shlex.split(line)


UNIT_FILES = ("deepfs-meta.service", "deepfs-node@.service", "deepfs-mount@.service")


@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_restarts_waits_for_the_network_and_raises_limits(name: str) -> None:
    unit = read_unit(UNITS / name)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert "network-online.target" in values(unit, "Unit", "After")
    assert "network-online.target" in values(unit, "Unit", "Wants")
    assert values(unit, "Service", "Restart") == ["on-failure"]
    assert int(values(unit, "Service", "LimitNOFILE")[0]) >= 65536
    assert values(unit, "Install", "WantedBy")


def test_server_units_run_the_walkthrough_toml(tmp_path: Path) -> None:
    """ExecStart of each unit, with every node index of the TOML, is accepted by the CLI; and the data
    directory systemd creates for it is the one its TOML entry names."""
    config = walkthrough_config(tmp_path)
    toml_file = tmp_path / "cluster.toml"
    meta = read_unit(UNITS / "deepfs-meta.service")
    args = exec_start(meta, {})
    assert args[0] == INSTALLED_DEEPFS and args[1:3] == ["meta", "serve"]
    assert "--secret-file" in args  # the cluster secret, made before the first start (docs/DEPLOY.md)
    check_command_line(args[1:], toml_file)
    assert f"/var/lib/{values(meta, 'Service', 'StateDirectory')[0]}" == config.meta.data_dir

    node = read_unit(UNITS / "deepfs-node@.service")
    for index, entry in enumerate(config.nodes):
        args = exec_start(node, {"%i": str(index)})
        assert args[0] == INSTALLED_DEEPFS and args[1:3] == ["node", "serve"]
        assert args[args.index("--key") + 1] == f"/etc/deepfs/node{index}.key"  # its own key
        check_command_line(args[1:], toml_file)
        state_dir = values(node, "Service", "StateDirectory")[0].replace("%i", str(index))
        assert f"/var/lib/{state_dir}" == entry.data_dir
    with pytest.raises(SystemExit):  # an instance with no [[nodes]] entry is refused
        check_command_line(exec_start(node, {"%i": str(len(config.nodes))})[1:], toml_file)


def test_mount_unit_mounts_the_escaped_path(tmp_path: Path) -> None:
    unit = read_unit(UNITS / "deepfs-mount@.service")
    environment_file = values(unit, "Service", "EnvironmentFile")[0]
    assert environment_file == "/etc/deepfs/mount.env"
    sample = dict(line.split("=", 1) for line in (UNITS / "mount.env.example").read_text().splitlines()
                  if line and not line.startswith("#"))
    args = exec_start(unit, {"%f": "/mnt/deepfs", "${DEEPFS_META}": sample["DEEPFS_META"]})
    assert args[:2] == [INSTALLED_DEEPFS, "mount"] and "--foreground" in args  # systemd supervises the daemon
    assert "--key" in args
    check_command_line(args[1:], tmp_path / "unused.toml")
    assert "remote-fs.target" in values(unit, "Unit", "Before")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own checker, on instances of the templates, with the binary pointed at this checkout's."""
    deepfs = str(Path(sys.executable).with_name("deepfs"))
    instances = {"deepfs-meta.service": "deepfs-meta.service", "deepfs-node@.service": "deepfs-node@0.service",
                 "deepfs-mount@.service": "deepfs-mount@mnt-deepfs.service"}
    for template, instance in instances.items():
        (tmp_path / instance).write_text((UNITS / template).read_text().replace(INSTALLED_DEEPFS, deepfs))
    result = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / i) for i in instances.values())],
                            capture_output=True, text=True, timeout=30, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Unknown key" not in output and "Unknown section" not in output, output


# -------------------------------------------------------------------- Kubernetes
def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in by_kind(kind) if doc["metadata"]["name"] == name]
    return found


# The official field names of the objects used (Kubernetes API reference, v1.28+), enough to catch a
# misspelt or misplaced key; not a full schema.
API_VERSIONS = {"Namespace": "v1", "ConfigMap": "v1", "Service": "v1", "StatefulSet": "apps/v1",
                "DaemonSet": "apps/v1", "Kustomization": "kustomize.config.k8s.io/v1beta1"}
FIELDS = {
    "StatefulSet.spec": {"serviceName", "replicas", "selector", "template", "volumeClaimTemplates",
                         "podManagementPolicy", "updateStrategy", "minReadySeconds", "revisionHistoryLimit",
                         "persistentVolumeClaimRetentionPolicy", "ordinals"},
    "DaemonSet.spec": {"selector", "template", "updateStrategy", "minReadySeconds", "revisionHistoryLimit"},
    "Service.spec": {"clusterIP", "clusterIPs", "type", "selector", "ports", "publishNotReadyAddresses",
                     "sessionAffinity", "ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy"},
    "PodSpec": {"containers", "initContainers", "volumes", "affinity", "topologySpreadConstraints",
                "nodeSelector", "tolerations", "terminationGracePeriodSeconds", "serviceAccountName",
                "securityContext", "hostNetwork", "dnsPolicy", "priorityClassName", "restartPolicy"},
    "Container": {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports",
                  "volumeMounts", "resources", "readinessProbe", "livenessProbe", "startupProbe",
                  "securityContext", "lifecycle", "workingDir"},
    "VolumeMount": {"name", "mountPath", "readOnly", "mountPropagation", "subPath"},
    "Volume": {"name", "configMap", "hostPath", "emptyDir", "persistentVolumeClaim", "secret"},
}
FIELD_REFS = re.compile(r"metadata\.(name|namespace|uid)|metadata\.labels\['[^']+'\]"
                        r"|spec\.(nodeName|serviceAccountName)|status\.(podIP|hostIP)")


def workloads() -> list[dict[str, Any]]:
    return by_kind("StatefulSet") + by_kind("DaemonSet")


def test_manifests_are_the_expected_objects_in_one_namespace() -> None:
    docs = manifests()
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted(["Namespace", "ConfigMap", "Service", "Service", "StatefulSet", "StatefulSet",
                            "DaemonSet", "Kustomization"])
    (namespace,) = by_kind("Namespace")
    for doc in docs:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], doc["kind"]
        if doc["kind"] not in ("Namespace", "Kustomization"):
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], doc["metadata"]["name"]
    kustomization = by_kind("Kustomization")[0]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")


def test_field_names_are_kubernetes_ones() -> None:
    for doc in by_kind("Service"):
        assert set(doc["spec"]) <= FIELDS["Service.spec"]
    for doc in workloads():
        assert set(doc["spec"]) <= FIELDS[f"{doc['kind']}.spec"]
        pod = doc["spec"]["template"]["spec"]
        assert set(pod) <= FIELDS["PodSpec"]
        for volume in pod.get("volumes", []):
            assert set(volume) <= FIELDS["Volume"] and len(volume) == 2, volume  # name and one source
        for container in pod["containers"]:
            assert set(container) <= FIELDS["Container"], container["name"]
            for mount in container.get("volumeMounts", []):
                assert set(mount) <= FIELDS["VolumeMount"]
            for variable in container.get("env", []):
                field_path = variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                assert field_path is None or FIELD_REFS.fullmatch(field_path), field_path


def test_selectors_services_volumes_and_ports_agree() -> None:
    config_maps = {doc["metadata"]["name"] for doc in by_kind("ConfigMap")}
    services = {doc["metadata"]["name"]: doc for doc in by_kind("Service")}
    for doc in workloads():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
        for container in pod["containers"]:
            port_names = {p["name"] for p in container.get("ports", [])}
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (doc["metadata"]["name"], mount["name"])
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["tcpSocket"]["port"] in port_names
        if doc["kind"] == "StatefulSet":
            service = services[doc["spec"]["serviceName"]]
            assert service["spec"]["clusterIP"] == "None"  # headless: stable per-pod DNS names
            assert service["spec"]["selector"].items() <= labels.items()
            container_ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def config_map_toml(tmp_path: Path) -> tuple[Path, ClusterConfig]:
    toml_file = write_toml(tmp_path, named("ConfigMap", "deepfs-config")["data"]["cluster.toml"])
    return toml_file, load_cluster_config(toml_file)


def container_commands(doc: dict[str, Any], env: dict[str, str]) -> list[list[str]]:
    """The deepfs command line of each container, with $(VAR) expanded as the kubelet would."""
    commands = []
    for container in doc["spec"]["template"]["spec"]["containers"]:
        defined = {variable["name"] for variable in container.get("env", [])}
        args = container["args"]
        for arg in args:
            assert set(re.findall(r"\$\((\w+)\)", arg)) <= defined, arg
        commands.append([re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args])
    return commands


def test_metadata_statefulset_runs_one_server_on_a_volume(tmp_path: Path) -> None:
    toml_file, config = config_map_toml(tmp_path)
    meta = named("StatefulSet", "deepfs-meta")
    assert meta["spec"]["replicas"] == 1  # one metadata server until issue 13 (the manifest says why)
    assert "issue 13" in (K8S / "meta.yaml").read_text()
    assert meta["spec"]["volumeClaimTemplates"]
    (args,) = container_commands(meta, {})
    check_command_line(args, toml_file)
    mounts = meta["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(config.meta.data_dir.startswith(m["mountPath"] + "/") and m["name"] == "data" for m in mounts)


def test_storage_statefulset_runs_every_nodes_entry_in_its_own_failure_domain(tmp_path: Path) -> None:
    toml_file, config = config_map_toml(tmp_path)
    nodes = named("StatefulSet", "deepfs-node")
    assert nodes["spec"]["replicas"] == len(config.nodes)
    assert nodes["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = nodes["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert [term["topologyKey"] for term in anti] == ["kubernetes.io/hostname"]
    assert [c["topologyKey"] for c in pod["topologySpreadConstraints"]] == ["topology.kubernetes.io/zone"]
    env = {v["name"]: v["valueFrom"]["fieldRef"]["fieldPath"] for v in pod["containers"][0]["env"]}
    assert env["NODE_NAME"] == "spec.nodeName"
    assert env["POD_INDEX"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    for index in range(nodes["spec"]["replicas"]):
        (args,) = container_commands(nodes, {"POD_INDEX": str(index), "POD_NAME": f"deepfs-node-{index}",
                                             "NODE_NAME": f"worker-{index}"})
        check_command_line(args, toml_file)
        from storage_node.server import parse_args

        node_config, _ = parse_args([str(toml_file) if a == ETC_TOML else a for a in args[2:]])
        assert node_config.failure_domain == f"worker-{index}"
        assert node_config.advertise_address == f"deepfs-node-{index}.deepfs-node.deepfs.svc.cluster.local:7710"
        assert node_config.meta_grpc.startswith("deepfs-meta-0.deepfs-meta.deepfs.svc")
    mounts = pod["containers"][0]["volumeMounts"]
    assert all(any(n.data_dir.startswith(m["mountPath"] + "/") and m["name"] == "data" for m in mounts)
               for n in config.nodes)


def test_mount_daemonset_is_privileged_with_fuse_and_bidirectional_propagation(tmp_path: Path) -> None:
    _, config = config_map_toml(tmp_path)
    daemon_set = named("DaemonSet", "deepfs-mount")
    (container,) = daemon_set["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in daemon_set["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    (args,) = container_commands(daemon_set, {})
    check_command_line(args, tmp_path / "unused.toml")
    from fuse_client.options import parse_args as parse_mount_args

    options = parse_mount_args(args[1:])
    assert options.foreground and options.meta_address == config.client.meta_address
    assert mounts[str(options.mountpoint)]["mountPropagation"] == "Bidirectional"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == INSTALLED_DEEPFS
    check_command_line(pre_stop[1:], tmp_path / "unused.toml")
