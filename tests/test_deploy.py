"""The deployment recipes (docs/deploy.md and deploy/): files parse, commands and options exist, examples run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import StartProcess, environment, serve_args, wait_ready

from tensorcom._net import security
from tensorcom.urls import expand_urls

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
DOC = ROOT / "docs" / "deploy.md"
SCRIPTS = sorted([*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch")])
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
BIN = Path(sys.executable).parent

PROGRAMS: dict[str, list[str]] = {
    "tensorcom serve": [str(BIN / "tensorcom"), "serve"],
    "tensorcom keygen": [str(BIN / "tensorcom"), "keygen"],
    "serve-synthetic": [str(BIN / "serve-synthetic")],
    "torchrun": [str(BIN / "torchrun")],
    "train.py": [sys.executable, str(DEPLOY / "train.py")],
}
_PROGRAM = re.compile(
    r"(?<![\w/.-])(?:[\w./$\"{}-]*/)?(" + "|".join(map(re.escape, PROGRAMS)) + r")(?![\w-])"
)
_END = re.compile(r"`|\|\s|;|&&|\s&(\s|$)|\)")


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            yield path, document


def containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = document.get("spec", {})
    template = spec.get("template", {}).get("spec", {})
    return list(template.get("containers", []))


def command_lines() -> list[str]:
    """Every line of the recipes that may run a program: doc and scripts (continuations joined), YAML commands."""
    lines = []
    for path in [DOC, *SCRIPTS]:
        lines += path.read_text().replace("\\\n", " ").splitlines()
    for _, document in manifests():
        for container in containers(document):
            lines.append(" ".join(map(str, [*container.get("command", []), *container.get("args", [])])))
    return lines


def invocations() -> dict[str, set[str]]:
    """The programs the recipes run, each with the long options given to it."""
    found: dict[str, set[str]] = {}
    for line in command_lines():
        matches = list(_PROGRAM.finditer(line))
        for number, match in enumerate(matches):
            stop = matches[number + 1].start() if number + 1 < len(matches) else len(line)
            rest = line[match.end() : stop]
            end = _END.search(rest)
            rest = rest[: end.start()] if end else rest
            found.setdefault(match.group(1), set()).update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest))
    return found


@cache
def help_text(program: str) -> str:
    result = subprocess.run([*PROGRAMS[program], "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{program} --help failed: {result.stderr}"
    return result.stdout


def test_the_recipes_use_the_programs_they_document() -> None:
    """The doc, scripts and manifests run tensorcom serve, keygen, torchrun and train.py (the scan finds them)."""
    assert {"tensorcom serve", "tensorcom keygen", "torchrun", "train.py"} <= invocations().keys()


@pytest.mark.parametrize("program", sorted(PROGRAMS), ids=sorted(PROGRAMS))
def test_every_program_and_option_in_the_recipes_exists(program: str) -> None:
    """Each program the recipes use answers --help, and every long option they pass it is in that help."""
    options = invocations().get(program)
    if options is None:
        pytest.skip(f"the recipes do not use {program}")
    if not Path(PROGRAMS[program][0]).exists():
        pytest.skip(f"{PROGRAMS[program][0]} is not installed")
    text = help_text(program)
    missing = sorted(option for option in options if not re.search(rf"{re.escape(option)}(?![\w-])", text))
    assert missing == [], f"{program} has no option {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.name for path in SCRIPTS])
def test_shell_scripts_parse(script: Path) -> None:
    """bash -n accepts every shell script in deploy/, and each is executable."""
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK)


def test_kubernetes_manifests_parse_and_agree() -> None:
    """The YAML parses; the headless Service selects the servers on the port they bind; key paths match the Secret."""
    documents = {document["kind"]: document for _, document in manifests()}
    for _, document in manifests():
        assert {"apiVersion", "kind", "metadata"} <= document.keys()
    service, deployment = documents["Service"], documents["Deployment"]
    assert service["spec"]["clusterIP"] == "None"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (server,) = containers(deployment)
    command = server["command"]
    assert command[:2] == ["tensorcom", "serve"]
    port = int(command[command.index("--bind") + 1].rsplit(":", 1)[1])
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    assert [p["containerPort"] for p in server["ports"]] == [port]
    env = {item["name"]: item.get("value") for item in server["env"]}
    mount = server["volumeMounts"][0]["mountPath"]
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    paths = {f"{mount}/{item['path']}" for item in volume["secret"]["items"]}
    assert env[security.SERVER_KEY_ENV] in paths
    assert any(path.startswith(env[security.CLIENT_KEYS_ENV] + "/") for path in paths)
    assert volume["secret"]["defaultMode"] == 0o400  # secret key files readable by their owner only


def test_environment_variables_named_in_the_recipes_are_the_ones_tensorcom_reads() -> None:
    """Every TENSORCOM_* variable in the doc, scripts and manifests is one of tensorcom._net.security's."""
    known = {
        security.SERVER_KEY_ENV,
        security.CLIENT_KEYS_ENV,
        security.CLIENT_KEY_ENV,
        security.SERVER_PUBLIC_KEY_ENV,
    }
    texts = [
        DOC.read_text(),
        (DEPLOY / "train.py").read_text(),
        *(p.read_text() for p in SCRIPTS + MANIFESTS),
    ]
    named = {name for text in texts for name in re.findall(r"TENSORCOM_[A-Z_]+", text)}
    assert named and named <= known, f"unknown: {sorted(named - known)}"
    assert known <= set(re.findall(r"TENSORCOM_[A-Z_]+", DOC.read_text()))


@pytest.mark.parametrize("hosts", [["cpu1", "cpu2", "cpu3"], ["cpu7"]], ids=["three-nodes", "one-node"])
def test_slurm_node_list_becomes_one_url_per_node(tmp_path: Path, hosts: list[str]) -> None:
    """The sbatch script's server_urls gives a zreq URL that expands to one URL per node of the node list."""
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n" + "".join(f"echo {host}\n" for host in hosts))
    fake.chmod(0o755)
    script = DEPLOY / "slurm" / "serve_and_train.sbatch"
    result = subprocess.run(
        ["bash", "-c", f'source "{script}" && server_urls 7880 "cpu[1-3]"'],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    assert expand_urls(result.stdout.strip()) == [f"zreq://{host}:7880" for host in hosts]


def test_train_script_resumes_from_its_checkpoint_on_the_example_data_module(
    start_process: StartProcess, tmp_path: Path
) -> None:
    """deploy/train.py against `tensorcom serve data:make`: 6 then 4 more steps leave the state of 10 in one go."""
    options = ("-o", "size=8", "-o", "batch_size=4", "-o", "n=30")
    server = start_process(
        *serve_args("data:make", *options), stdout=subprocess.PIPE, env=environment(DEPLOY)
    )
    url = wait_ready(server)

    def train(checkpoint: Path, steps: int) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "train.py"), "--servers", url, "--seed", "3", "--timeout", "30"]
            + ["--steps", str(steps), "--checkpoint", str(checkpoint)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert f"step {steps}," in result.stdout
        return dict(json.loads(checkpoint.read_text()))

    train(tmp_path / "resumed.json", 6)
    resumed = train(tmp_path / "resumed.json", 10)
    straight = train(tmp_path / "straight.json", 10)
    assert resumed == straight and resumed["step"] == 10
    assert resumed["loader"]["pipeline"] is not None


def test_torchrun_is_available_where_the_recipe_needs_it() -> None:
    """run.sh calls torchrun, which the torch extra installs next to tensorcom."""
    if shutil.which("torchrun", path=str(BIN)) is None:
        pytest.skip("torch (and torchrun) not installed in this environment")
    assert "--nproc-per-node" in help_text("torchrun")


def test_train_script_lists_every_address_of_a_dns_name() -> None:
    """--servers-dns turns a name into one zreq URL per address, as a headless Service's name gives every pod."""
    spec = importlib.util.spec_from_file_location("deploy_train", DEPLOY / "train.py")
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    urls = train.urls_from_dns("localhost", 7880)
    assert "zreq://127.0.0.1:7880" in urls or "zreq://[::1]:7880" in urls
    assert urls == sorted(set(urls))
