"""deploy/k8s: the manifests parse, reference each other, and run commands the installed CLI accepts.

No cluster: the YAML is read as data. The `tinyopt` command lines of the containers (also inside
`sh -c` scripts) are checked against `tinyopt sweep --help` of this checkout, and their `--set`
overrides against the config loader, so a renamed option or config key fails here, naming it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
import urllib.parse
from functools import cache
from pathlib import Path

import pytest
import yaml

from tinyopt.core.config import load_config
from tinyopt.core.errors import ConfigError

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
MANIFESTS = sorted(path for path in [*K8S.glob("*.yaml"), *K8S.glob("*.yml")] if path != KUSTOMIZATION)
POD_OWNERS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
SHELLS = ("sh", "bash", "ash", "dash")


@cache
def documents(path: Path) -> tuple[dict, ...]:
    with path.open(encoding="utf-8") as handle:
        return tuple(doc for doc in yaml.safe_load_all(handle) if doc is not None)


def all_documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in documents(path)]


def named(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in all_documents() if doc.get("kind") == kind}


def pod_specs() -> list[tuple[str, dict]]:
    return [(f"{name} {doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
            for name, doc in all_documents() if doc.get("kind") in POD_OWNERS]


def containers() -> list[tuple[str, dict]]:
    return [(f"{where} container {container['name']}", container)
            for where, spec in pod_specs()
            for container in [*spec.get("initContainers", []), *spec.get("containers", [])]]


def command_lines(argv: list[str]) -> list[list[str]]:
    """The simple commands of a container's argv: itself, or each command of an `sh -c` script."""
    if len(argv) >= 3 and Path(argv[0]).name in SHELLS and argv[1] == "-c":
        lexer = shlex.shlex(argv[2], posix=True, punctuation_chars=";&|()\n")
        lexer.whitespace = " \t\r"
        lexer.whitespace_split = True
        lines, current = [], []
        for token in lexer:
            if token and set(token) <= set(";&|()\n"):
                lines.append(current)
                current = []
            else:
                current.append(token)
        lines.append(current)
        found = []
        for line in lines:
            words = [word for word in line if not re.fullmatch(r"[A-Za-z_]\w*=.*", word)]  # VAR=value prefixes
            while words and words[0] in ("exec", "do", "then", "else", "until", "while", "if", "!"):
                words = words[1:]
            if words:
                found.append(words)
        return found
    return [argv]


def commands_of(program: str) -> list[tuple[str, list[str]]]:
    found = []
    for where, container in containers():
        argv = [str(word) for word in [*container.get("command", []), *container.get("args", [])]]
        found += [(where, line) for line in command_lines(argv) if line and Path(line[0]).name == program]
    return found


def tinyopt_commands() -> list[tuple[str, list[str]]]:
    return commands_of("tinyopt")


@cache
def cli_help(program: str, *words: str) -> str:
    """`--help` of an installed command (`python -m tinyopt sweep --help`), as a user sees it."""
    result = subprocess.run([sys.executable, "-m", program, *words, "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, f"{program} {' '.join(words)} --help failed: {result.stderr}"
    return result.stdout


def help_options(text: str) -> dict[str, bool]:
    """`--option` -> whether it takes a value, from a click help page (option lines are indented by 2)."""
    options = {}
    for match in re.finditer(r"^ {2}(?:-\w, )?(--[\w-]+)(?: / (--[\w-]+))?(?:, -\w)?( [A-Z<\[]\S*)?", text, re.M):
        options.setdefault(match.group(1), bool(match.group(3)))
        if match.group(2):  # --flag / --no-flag
            options.setdefault(match.group(2), False)
    return options


def parse(where: str, program: str, argv: list[str],
          options: dict[str, bool]) -> tuple[list[str], dict[str, list[str]]]:
    """Positional words and `--option` values of a command line, failing on an option the help lacks."""
    positional, values = [], {}
    words = iter(argv)
    for word in words:
        if not word.startswith("--"):
            positional.append(word)
            continue
        name, sep, value = word.partition("=")
        if name not in options:
            known = ", ".join(sorted(options))
            pytest.fail(f"{where}: `{program}` has no option {name} (it has: {known})", pytrace=False)
        if options[name] and not sep:
            value = next(words, None)
            assert value is not None, f"{where}: {name} needs a value"
        values.setdefault(name, []).append(value)
    return positional, values


def sweep(where: str, argv: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The approach and options of a `tinyopt sweep ...` command line, checked against its help."""
    assert argv[1:2] == ["sweep"], f"{where}: expected `tinyopt sweep APPROACH ...`, got {shlex.join(argv)}"
    text = cli_help("tinyopt", "sweep")
    choices = re.search(r"Usage: .*\{([\w|]+)\}", text).group(1).split("|")
    positional, values = parse(where, "tinyopt sweep", argv[2:], help_options(text))
    assert len(positional) == 1, f"{where}: expected one approach, got {positional}"
    assert positional[0] in choices, f"{where}: unknown approach {positional[0]!r} (the CLI takes {choices})"
    return positional[0], values


def sweep_commands() -> list[tuple[str, str, dict[str, list[str]]]]:
    return [(where, *sweep(where, argv)) for where, argv in tinyopt_commands()]


def settings(values: dict[str, list[str]]) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in values.get("--set", []))


def test_there_are_manifests():
    assert KUSTOMIZATION.is_file()
    assert MANIFESTS


@pytest.mark.parametrize("path", [KUSTOMIZATION, *MANIFESTS], ids=lambda path: path.name)
def test_every_document_parses_and_names_itself(path):
    docs = documents(path)
    assert docs, f"{path.name} holds no document"
    for number, doc in enumerate(docs, 1):
        assert isinstance(doc, dict), f"{path.name} document {number} is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name} document {number}: no apiVersion or kind"
        if doc["kind"] != "Kustomization":
            assert (doc.get("metadata") or {}).get("name"), f"{path.name} {doc['kind']}: no metadata.name"


def test_kustomization_lists_exactly_the_manifests():
    (kustomization,) = documents(KUSTOMIZATION)
    listed = kustomization.get("resources", [])
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    assert set(listed) == {path.name for path in MANIFESTS}


def test_names_are_unique_per_kind():
    seen = set()
    for name, doc in all_documents():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{name}: a second {key[0]} named {key[1]}"
        seen.add(key)


def test_references_resolve():
    """Every claim, Secret, ConfigMap and selector a pod names is defined here."""
    claims, secrets, config_maps = named("PersistentVolumeClaim"), named("Secret"), named("ConfigMap")
    for where, spec in pod_specs():
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{where}: {volume}"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{where}: {volume}"
    for where, container in containers():
        for variable in container.get("env", []):
            ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                secret = secrets.get(ref["name"], {})
                keys = {*secret.get("stringData", {}), *secret.get("data", {})}
                assert ref["key"] in keys, f"{where}: {variable} names no key of a Secret here"
    for name, doc in all_documents():
        if doc["kind"] in POD_OWNERS and "selector" in doc["spec"]:
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), name


def test_no_password_in_a_command_line():
    """Not even expanded from the environment by `sh -c`: a process's argv is public (ps); libpq reads PGPASSWORD."""
    for where, container in containers():
        for variable in container.get("env", []):
            if re.search("PASSWORD|SECRET|TOKEN", variable["name"]):
                assert "value" not in variable, f"{where}: {variable['name']} in clear; use a secretKeyRef"
        for word in [*container.get("command", []), *container.get("args", [])]:
            assert not re.search(r"://[^/@\s:]+:[^/@\s]+@", str(word)), f"{where}: a password in {word!r}"


def test_the_containers_run_tinyopt_sweep():
    assert tinyopt_commands(), "no container runs tinyopt"
    for where, approach, values in sweep_commands():
        assert approach == "finetune", where
        assert "--max-trials" in values, f"{where}: workers on several nodes need --max-trials to cap the study"


def test_sweep_options_exist():
    """A misspelled option or approach fails here, by name (`sweep` and `parse` check each word)."""
    assert sweep_commands()


def test_sweep_overrides_are_known_config_keys():
    """`--set` keys and values load as the CLI loads them: defaults, the --preset, then the overrides."""
    for where, approach, values in sweep_commands():
        overrides = values.get("--set", [])
        preset = (values.get("--preset") or [None])[-1]
        try:
            load_config(approach, overrides=overrides, preset=preset)
        except ConfigError as err:
            pytest.fail(f"{where}: {err}", pytrace=False)


def test_stores_are_services_of_these_manifests():
    """The storage and tracking URLs name Services defined here, on their ports, with no password."""
    services = named("Service")
    for where, _approach, values in sweep_commands():
        for option, default_port in (("--storage", 5432), ("--tracking-uri", 80)):
            url = urllib.parse.urlsplit(values[option][-1])
            assert url.hostname in services, f"{where}: {option} names {url.hostname}, not a Service here"
            ports = [port["port"] for port in services[url.hostname]["spec"]["ports"]]
            assert (url.port or default_port) in ports, f"{where}: {option} port not in {ports}"
            assert url.password is None, f"{where}: {option} carries a password"


def worker_job() -> tuple[str, dict, dict]:
    jobs = [(name, doc) for name, doc in all_documents() if doc["kind"] == "Job"]
    assert len(jobs) == 1, f"expected one Job, got {[doc['metadata']['name'] for _, doc in jobs]}"
    name, job = jobs[0]
    (worker,) = [container for container in job["spec"]["template"]["spec"]["containers"]
                 if any(Path(word).name == "tinyopt" for word in container.get("command", [])[:1])]
    return name, job, worker


def test_the_job_is_indexed_with_one_gpu_per_worker():
    name, job, worker = worker_job()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed", name
    assert spec["parallelism"] == spec["completions"] >= 1, name
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1, name


def test_an_evicted_worker_is_replaced_without_counting_as_a_failure():
    name, job, worker = worker_job()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never", f"{name}: podFailurePolicy needs restartPolicy Never"
    assert pod["terminationGracePeriodSeconds"] > 60, f"{name}: tinyopt gives a stuck worker 60 s after SIGTERM"
    rules = spec["podFailurePolicy"]["rules"]
    ignored = [rule for rule in rules if rule["action"] == "Ignore"]
    assert any(condition["type"] == "DisruptionTarget" and condition.get("status") == "True"
               for rule in ignored for condition in rule.get("onPodConditions", [])), name
    assert any(143 in rule["onExitCodes"]["values"] and rule["onExitCodes"]["operator"] == "In"
               and rule["onExitCodes"].get("containerName", worker["name"]) == worker["name"]
               for rule in ignored if "onExitCodes" in rule), name
    assert spec["backoffLimit"] >= 1, name


def test_checkpoints_are_on_a_shared_volume_where_the_config_says():
    name, job, worker = worker_job()
    (argv,) = [line for line in command_lines([*worker.get("command", []), *worker.get("args", [])])
               if Path(line[0]).name == "tinyopt"]
    _approach, values = sweep(name, argv)
    overrides = settings(values)
    assert overrides.get("train.checkpoint") == "epoch", f"{name}: --set train.checkpoint=epoch"
    directory = overrides.get("train.checkpoint_dir")
    assert directory and directory.startswith("/"), f"{name}: train.checkpoint_dir must be an absolute path"
    mounts = [mount for mount in worker.get("volumeMounts", [])
              if directory == mount["mountPath"] or directory.startswith(mount["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{name}: nothing is mounted at train.checkpoint_dir {directory}"
    mount = max(mounts, key=lambda mount: len(mount["mountPath"]))
    assert not mount.get("readOnly"), f"{name}: {directory} is mounted read-only"
    volumes = {volume["name"]: volume for volume in job["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mount["name"]].get("persistentVolumeClaim")
    assert claim, f"{name}: {directory} is not on a PersistentVolumeClaim"
    claim = named("PersistentVolumeClaim")[claim["claimName"]]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], f"{name}: workers on several nodes share {directory}"


def test_the_mlflow_server_command_matches_its_cli():
    """`mlflow server`'s options exist, and it accepts the Host header the workers send."""
    servers = commands_of("mlflow")
    assert servers, "no container runs mlflow server"
    for where, argv in servers:
        assert argv[1] == "server", where
        _positional, values = parse(where, "mlflow server", argv[2:], help_options(cli_help("mlflow", "server")))
        assert values.get("--serve-artifacts") is not None, f"{where}: workers upload artifacts through the server"
        allowed = values["--allowed-hosts"][-1].split(",") if "--allowed-hosts" in values else []
        for _where, _approach, options in sweep_commands():
            host = urllib.parse.urlsplit(options["--tracking-uri"][-1]).netloc
            assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), \
                f"{where}: --allowed-hosts must admit {host}, the Host header the workers send"
