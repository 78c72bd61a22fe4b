"""Deployment files under deploy/, checked offline: no network, no docker daemon, no cloud.

Ray cluster configs validate against the schema shipped in the installed `ray`; every
`gemma-dist` command line anywhere in deploy/ parses with the real CLI parser (and `serve`
lines pass `--dry-run`); Kubernetes probes, ports and Services agree with those command lines;
the Dockerfiles are multi-stage, non-root and health-checked.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest
import yaml

from gemma_dist.cli import build_parser, main
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RAY_CONFIGS = sorted((DEPLOY / "ray").glob("*.yaml"))
K8S_MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))
README = DEPLOY / "README.md"
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
PUNCTUATION = set(";&|<>()")
COMMAND_PREFIXES = {"nohup", "exec", "sudo", "time", "env", "command"}
SUBCOMMANDS = {"serve", "generate", "scale", "bench"}
# Provider and device each Ray config is meant for.
RAY_TARGETS = {"gcp-gpu.yaml": ("gcp", "cuda"), "gcp-tpu.yaml": ("gcp", "xla"), "aws-gpu.yaml": ("aws", "cuda")}


# ---- extracting `gemma-dist ...` command lines ------------------------------------------------

def is_gemma_dist(token: str) -> bool:
    """True for a word naming the console script (`gemma-dist`, `/opt/venv/bin/gemma-dist`)."""
    return ":" not in token and (token == "gemma-dist" or token.endswith("/gemma-dist"))


def starts_command(tokens: list[str], i: int, command_position: bool) -> bool:
    """True when tokens[i] runs gemma-dist: a gemma-dist word with arguments where a shell runs a
    command, or one followed by a subcommand anywhere (`docker exec NAME gemma-dist generate ...`)."""
    if not is_gemma_dist(tokens[i]) or i + 1 == len(tokens) or set(tokens[i + 1]) <= PUNCTUATION:
        return False
    return command_position or tokens[i + 1] in SUBCOMMANDS


def shell_commands(text: str) -> list[list[str]]:
    """The argv (after `gemma-dist`) of every gemma-dist command in shell text.

    Handles `\\` continuations, comments, `;`/`&&`/`|`/`&` separators, `nohup`/`exec`/`VAR=x`
    prefixes, redirections (`> log 2>&1 < /dev/null`), and commands nested in one quoted word
    (`bash -c "..."`, `ray exec cfg '...'`). A bare name (`svc/gemma-dist`, a label) is no command.
    """
    text = re.sub(r"\\\r?\n", " ", text)
    found = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)\d+(?=[<>])", r"\1", line)  # `2>&1` -> `>&1`: the fd is not an argument
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        command_position = True
        for i, token in enumerate(tokens):
            if starts_command(tokens, i, command_position):
                argv = []
                for arg in tokens[i + 1:]:
                    if set(arg) <= PUNCTUATION:
                        break
                    argv.append(arg)
                found.append(argv)
            elif "gemma-dist" in token and re.search(r"\s", token):
                found.extend(shell_commands(token))
            is_prefix = token in COMMAND_PREFIXES or re.fullmatch(r"[A-Za-z_]\w*=\S*", token)
            command_position = set(token) <= PUNCTUATION or bool(command_position and is_prefix)
    return found


def exec_form(argv: list) -> list[list[str]]:
    """Commands in an exec-form argv: the words after a gemma-dist word, else any shell text inside."""
    argv = [str(a) for a in argv]
    for i, word in enumerate(argv):
        if is_gemma_dist(word):
            return [argv[i + 1:]]
    return [cmd for word in argv for cmd in shell_commands(word)]


def yaml_commands(node) -> list[list[str]]:
    """Commands in a loaded YAML tree: container command+args as one argv, other strings as shell text."""
    if isinstance(node, dict):
        if isinstance(node.get("command"), list) or isinstance(node.get("args"), list):
            found = exec_form(list(node.get("command") or []) + list(node.get("args") or []))
            rest = {k: v for k, v in node.items() if k not in ("command", "args")}
            return found + yaml_commands(rest)
        return [cmd for value in node.values() for cmd in yaml_commands(value)]
    if isinstance(node, list):
        return [cmd for value in node for cmd in yaml_commands(value)]
    return shell_commands(node) if isinstance(node, str) else []


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuations joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def docker_argv(arguments: str) -> list[str] | None:
    """The exec-form (JSON array) argv of CMD/ENTRYPOINT, or None for the shell form."""
    return json.loads(arguments) if arguments.startswith("[") else None


def dockerfile_commands(path: Path) -> list[list[str]]:
    """Commands a Dockerfile runs: ENTRYPOINT + CMD as the container argv, RUN lines as shell text."""
    instructions = dockerfile_instructions(path)
    last = {kind: args for kind, args in instructions if kind in ("CMD", "ENTRYPOINT")}
    found = [cmd for kind, args in instructions if kind == "RUN" for cmd in shell_commands(args)]
    entry, cmd = (docker_argv(last[k]) if k in last else [] for k in ("ENTRYPOINT", "CMD"))
    if entry is None or cmd is None:  # a shell form: ENTRYPOINT ignores CMD, CMD runs under sh -c
        found += shell_commands(last["ENTRYPOINT"] if entry is None else last["CMD"])
    else:
        found += exec_form(entry + cmd)
    return found


def readme_commands(path: Path) -> list[list[str]]:
    """Commands in the shell code blocks of a Markdown file."""
    blocks = re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", path.read_text(), re.M | re.S)
    return [cmd for m in blocks if m.group(1) in SHELL_FENCES for cmd in shell_commands(m.group(2))]


def all_commands() -> list[tuple[str, list[str]]]:
    """(source file, argv) of every gemma-dist command line in deploy/."""
    found = []
    for path in RAY_CONFIGS + K8S_MANIFESTS:
        found += [(path, argv) for doc in yaml.safe_load_all(path.read_text()) for argv in yaml_commands(doc)]
    found += [(path, argv) for path in DOCKERFILES for argv in dockerfile_commands(path)]
    found += [(README, argv) for argv in readme_commands(README)]
    return [(str(path.relative_to(ROOT)), argv) for path, argv in found]


COMMANDS = all_commands()


def serve_args(argv: list[str]):
    """The parsed namespace of a `serve` argv."""
    args = build_parser().parse_args(argv)
    assert args.command == "serve", argv
    return args


def test_extractor_handles_continuations_redirections_and_nesting():
    text = """
# gemma-dist serve --replicas 99   (a comment, not a command)
nohup /opt/venv/bin/gemma-dist serve --address auto --replicas 2 > ~/serve.log 2>&1 < /dev/null & echo $! > pid
ray start --head && exec gemma-dist serve --host 0.0.0.0 \\
    --tp 2; echo done
ray exec cfg.yaml 'kill $(cat pid); gemma-dist scale --replicas 3 --target 127.0.0.1:50051'
pip install "gemma_dist @ git+https://example.com/gemma_dist.git" && docker run gemma-dist:cpu
gemma-dist generate --target "$HEAD_IP:50051" --stop "a; b" "Once upon a time" | tee out.txt
kubectl port-forward svc/gemma-dist 50051:50051 && echo gemma-dist is a name here
docker exec gemma gemma-dist generate "Hi"; GEMMA_DIST_CACHE=/cache gemma-dist serve --port 1
"""
    assert shell_commands(text) == [
        ["serve", "--address", "auto", "--replicas", "2"],
        ["serve", "--host", "0.0.0.0", "--tp", "2"],
        ["scale", "--replicas", "3", "--target", "127.0.0.1:50051"],
        ["generate", "--target", "$HEAD_IP:50051", "--stop", "a; b", "Once upon a time"],
        ["generate", "Hi"],
        ["serve", "--port", "1"],
    ]
    assert yaml_commands({"metadata": {"labels": {"app": "gemma-dist"}}}) == []
    assert exec_form(["gemma-dist", "serve", "--port", "50052"]) == [["serve", "--port", "50052"]]
    assert exec_form(["/bin/bash", "-c", "ray start && exec gemma-dist serve --tp 4"]) == [["serve", "--tp", "4"]]


def test_extractor_found_commands_in_every_kind_of_file():
    per_file = {}
    for source, _ in COMMANDS:
        per_file[source] = per_file.get(source, 0) + 1
    expected = [p.relative_to(ROOT) for p in RAY_CONFIGS + DOCKERFILES + [README]]
    expected.append((DEPLOY / "k8s" / "gateway.yaml").relative_to(ROOT))
    assert len(RAY_CONFIGS) == 3 and len(DOCKERFILES) == 2 and len(K8S_MANIFESTS) >= 2
    missing = [str(p) for p in expected if per_file.get(str(p), 0) == 0]
    assert not missing, f"no gemma-dist command found in {missing}"
    assert per_file[str(README.relative_to(ROOT))] >= 15
    assert len(COMMANDS) >= 20
    subcommands = {argv[0] for _, argv in COMMANDS if argv}
    assert subcommands == {"serve", "generate", "scale"}


def option_strings(command: str) -> set[str]:
    """Every option string the real parser defines for one subcommand."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(subparsers.choices[command]._option_string_actions)


@pytest.mark.parametrize("source,argv", COMMANDS, ids=[f"{s}:{''.join(a[:1])}#{i}" for i, (s, a) in
                                                        enumerate(COMMANDS)])
def test_every_command_line_parses(source, argv, capsys):
    args = build_parser().parse_args(argv)  # SystemExit (a failed test) on any unknown flag or bad value
    flags = {word.split("=")[0] for word in argv if word.startswith("--")}
    assert flags <= option_strings(args.command), "flags spelled out in full, not abbreviated"
    if args.command != "serve":
        return
    assert main(argv + ["--dry-run"]) == 0, capsys.readouterr().err
    settings = json.loads(capsys.readouterr().out)
    assert settings["replicas"] == args.replicas and settings["port"] == args.port and settings["tp"] == args.tp


# ---- Ray cluster launcher configs ---------------------------------------------------------------

def load_ray_config(path: Path) -> dict:
    """A cluster config as `ray up` sees it: provider defaults filled in, setup commands merged."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(yaml.safe_load(path.read_text())))


def head_serve_argv(config: dict) -> list[str]:
    """The one `gemma-dist serve` argv among the head's start commands."""
    serves = [argv for command in config["head_start_ray_commands"] for argv in shell_commands(command)]
    assert len(serves) == 1, serves
    return serves[0]


def worker_types(config: dict) -> dict:
    """The node types other than the head's."""
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_config_validates_against_rays_schema(path):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    raw = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # as written
    validate_config(load_ray_config(path))  # as `ray up` checks it, after defaults
    assert path.name in RAY_TARGETS


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_config_head_starts_ray_then_serves_in_the_background(path):
    config = load_ray_config(path)
    provider, device = RAY_TARGETS[path.name]
    assert config["provider"]["type"] == provider
    commands = config["head_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(commands) if "ray start" in c and "--head" in c)
    serve = next(i for i, c in enumerate(commands) if shell_commands(c))
    assert ray_start < serve
    assert re.search(r"\bnohup\b.*&\s*(echo|$)", " ".join(commands[serve].split())), commands[serve]
    args = serve_args(head_serve_argv(config))
    assert (args.address, args.host, args.device) == ("auto", "0.0.0.0", device)
    assert args.dtype == "bfloat16"


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_config_installs_gemma_dist_on_every_node(path):
    config = load_ray_config(path)
    for key in ("head_setup_commands", "worker_setup_commands"):
        text = "\n".join(config[key])
        assert "gemma_dist" in text and "pip install ." in text, key
        # The stubs must exist before setuptools lists the packages (else the wheel lacks gemma_dist/v1).
        assert text.index("gemma_dist/server/codegen.py") < text.index("pip install ."), key
        assert re.search(r"ray\[default\]==\d", text), key


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_config_workers_hold_the_replicas_at_startup(path):
    config = load_ray_config(path)
    args = serve_args(head_serve_argv(config))
    workers = worker_types(config)
    assert workers
    if RAY_TARGETS[path.name][1] == "xla":  # one replica per TPU host (SPMD over its chips)
        assert sum(t["min_workers"] for t in workers.values()) >= args.replicas
        return
    if config["provider"]["type"] == "aws":
        assert all(t["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "g6e", "p4d", "p5")
                   for t in workers.values())
        return  # AWS detects GPUs from the instance type
    gpus = sum(t["min_workers"] * t["resources"].get("GPU", 0) for t in workers.values())
    assert gpus >= args.replicas * args.tp


def test_gcp_gpu_workers_attach_gpus_and_terminate_on_maintenance():
    config = load_ray_config(DEPLOY / "ray" / "gcp-gpu.yaml")
    for node_type in worker_types(config).values():
        node = node_type["node_config"]
        accelerators = node["guestAccelerators"]
        assert sum(a["acceleratorCount"] for a in accelerators) == node_type["resources"]["GPU"] >= 1
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"


def test_gcp_tpu_workers_are_tpu_vms_and_head_is_not():
    from ray._private.accelerators import TPUAcceleratorManager

    config = load_ray_config(DEPLOY / "ray" / "gcp-tpu.yaml")
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert "machineType" in head and "acceleratorType" not in head  # TPUs cannot be Ray heads
    for node_type in worker_types(config).values():
        node = node_type["node_config"]
        assert "machineType" not in node and node["runtimeVersion"]
        assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(node["acceleratorType"])
        assert node_type["resources"]["TPU"] >= 1
    assert "torch_xla" in "\n".join(config["worker_setup_commands"])


# ---- Kubernetes manifests -----------------------------------------------------------------------

def k8s_documents() -> list[dict]:
    """Every document of every manifest under deploy/k8s."""
    return [doc for path in K8S_MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def one_of_kind(kind: str) -> dict:
    """The single manifest document of this kind."""
    docs = [doc for doc in k8s_documents() if doc["kind"] == kind]
    assert len(docs) == 1, f"{len(docs)} documents of kind {kind}"
    return docs[0]


def gateway_container() -> tuple[dict, list[str]]:
    """The gateway Deployment's container that runs `gemma-dist serve`, and that serve argv."""
    spec = one_of_kind("Deployment")["spec"]["template"]["spec"]
    matches = [(c, argv) for c in spec["containers"] for argv in yaml_commands(c) if argv[:1] == ["serve"]]
    assert len(matches) == 1, matches
    return matches[0]


def test_k8s_manifests_carry_identity():
    docs = k8s_documents()
    assert {doc["kind"] for doc in docs} >= {"RayCluster", "Deployment", "Service"}
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc


def test_gateway_probes_ports_and_service_agree_with_its_command():
    container, argv = gateway_container()
    args = serve_args(argv)
    assert args.host == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == args.port, probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {args.port, args.metrics_port} <= set(ports.values())
    service = one_of_kind("Service")
    target_ports = {p["port"]: ports.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert target_ports[args.port] == args.port and target_ports[args.metrics_port] == args.metrics_port
    labels = one_of_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_gateway_joins_the_rayclusters_head_service():
    _, argv = gateway_container()
    head_service = f"{one_of_kind('RayCluster')['metadata']['name']}-head-svc:6379"  # KubeRay's naming
    assert serve_args(argv).address == head_service
    container, _ = gateway_container()
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert f"ray start --address={head_service}" in script  # a Ray driver must run on a Ray node


def pod_runs_as_non_root(pod_spec: dict, container: dict) -> bool:
    """True when the pod or the container asks for a non-root uid."""
    merged = {**pod_spec.get("securityContext", {}), **container.get("securityContext", {})}
    return merged.get("runAsNonRoot") is True and merged.get("runAsUser", 1000) != 0


def test_gateway_and_ray_pods_are_non_root_with_resources():
    deployment = one_of_kind("Deployment")["spec"]["template"]["spec"]
    cluster = one_of_kind("RayCluster")["spec"]
    pods = [deployment, cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["containers"]:
            assert pod_runs_as_non_root(pod, container), container["name"]
            assert container["resources"]["limits"]["memory"], container["name"]


def test_raycluster_has_head_and_gpu_workers_on_the_gateways_image():
    cluster = one_of_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert spec["workerGroupSpecs"]
    images = {c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            images.add(container["image"])
    container, argv = gateway_container()
    assert images == {container["image"]}  # same Ray and gemma_dist on every node
    args = serve_args(argv)
    gpus = sum(g["replicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    assert gpus >= args.replicas * args.tp


# ---- Dockerfiles --------------------------------------------------------------------------------

def container_argv(path: Path) -> list[str]:
    """The argv a container of this image runs by default (ENTRYPOINT + CMD, exec form)."""
    last = {kind: args for kind, args in dockerfile_instructions(path) if kind in ("CMD", "ENTRYPOINT")}
    return (docker_argv(last.get("ENTRYPOINT", "[]")) or []) + (docker_argv(last["CMD"]) or [])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multistage_non_root_exposed_and_health_checked(path):
    instructions = dockerfile_instructions(path)
    kinds = [kind for kind, _ in instructions]
    assert kinds.count("FROM") >= 2
    final_stage = instructions[max(i for i, k in enumerate(kinds) if k == "FROM"):]
    users = [args for kind, args in final_stage if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    exposed = {port.split("/")[0] for kind, args in final_stage if kind == "EXPOSE" for port in args.split()}
    args = serve_args(exec_form(container_argv(path))[0])
    assert {"50051", str(args.port), str(args.metrics_port)} <= exposed
    assert args.host == "0.0.0.0"
    health = [a for kind, a in final_stage if kind == "HEALTHCHECK"]
    assert len(health) == 1 and f"127.0.0.1:{args.port}" in health[0] and "healthcheck.py" in health[0]
    assert args.device == ("cuda" if path.name.endswith("cuda") else "cpu")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builder_generates_stubs_and_copies_only_allowed_files(path):
    instructions = dockerfile_instructions(path)
    runs = "\n".join(args for kind, args in instructions if kind == "RUN")
    assert runs.index("gemma_dist/server/codegen.py") < runs.index("pip install .")
    ignore = Path(f"{path}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else stays out of the context (.venv is gigabytes)
    for kind, args in instructions:
        if kind == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is not in {path.name}.dockerignore"


def test_one_ray_version_everywhere():
    pins = {}
    for path in RAY_CONFIGS + [README]:
        pins[path.name] = set(re.findall(r"ray\[default\]==([\d.]+)", path.read_text()))
    for path in DOCKERFILES:
        pins[path.name] = set(re.findall(r"ARG RAY_VERSION=([\d.]+)", path.read_text()))
    pins["RayCluster"] = {one_of_kind("RayCluster")["spec"]["rayVersion"]}
    assert all(pins.values()), pins  # every file pins Ray
    assert len(set().union(*pins.values())) == 1, pins  # `ray up` and KubeRay need one Ray everywhere


# ---- deploy/healthcheck.py ----------------------------------------------------------------------


def run_healthcheck(*argv: str) -> int:
    """Exit code of deploy/healthcheck.py run as the images run it."""
    done = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), *argv], capture_output=True,
                          text=True, timeout=60)
    return done.returncode


def test_healthcheck_script_follows_grpc_health():
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_healthcheck(f"127.0.0.1:{port}") == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run_healthcheck(f"127.0.0.1:{port}") == 1
    finally:
        server.stop(None)
    assert run_healthcheck(f"127.0.0.1:{free_port()}", "--timeout", "1") == 1


# ---- docs ---------------------------------------------------------------------------------------

def test_readmes_link_and_cover_every_deploy_file():
    assert "(deploy/README.md)" in (ROOT / "README.md").read_text()
    text = README.read_text()
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p != README and "__pycache__" not in p.parts]
    missing = [str(p.relative_to(ROOT)) for p in files if str(p.relative_to(ROOT)) not in text]
    assert not missing, f"deploy/README.md does not mention {missing}"


# ---- gemma-dist serve --dry-run -----------------------------------------------------------------

def dry_run(argv: list[str], capsys) -> tuple[int, dict | None, str]:
    """(exit code, printed settings or None, stderr) of `gemma-dist serve ARGV --dry-run`."""
    code = main(["serve", *argv, "--dry-run"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def test_dry_run_prints_the_resolved_settings(capsys):
    code, settings, _ = dry_run(["--replicas", "3", "--tp", "2", "--device", "cuda", "--host", "0.0.0.0",
                                 "--port", "6000", "--address", "auto", "--max-queued-requests", "8"], capsys)
    assert code == 0
    assert settings["replicas"] == 3 and settings["tp"] == 2 and settings["port"] == 6000
    assert settings["device"] == "cuda" and settings["dtype"] == "bfloat16"  # resolved from the device
    assert settings["address"] == "auto" and settings["max_queued_requests"] == 8
    assert settings["metrics_port"] == 8000 and "dry_run" not in settings and "command" not in settings
    assert dry_run(["--device", "cpu"], capsys)[1]["dtype"] == "float32"
    assert dry_run(["--device", "xla", "--dtype", "float32"], capsys)[1]["dtype"] == "float32"
    assert dry_run([], capsys)[1]["dtype"] is None  # auto: decided once the device is known


def test_dry_run_shows_the_step_limits_and_dispatch(capsys):
    defaults = dry_run([], capsys)[1]
    assert (defaults["max_num_seqs"], defaults["max_num_batched_tokens"]) == (64, 2048)  # LLM(...)'s defaults
    assert defaults["step_dispatch"] == "auto"
    settings = dry_run(["--max-num-seqs", "256", "--max-num-batched-tokens", "8192",
                        "--step-dispatch", "compiled-graph"], capsys)[1]
    assert (settings["max_num_seqs"], settings["max_num_batched_tokens"]) == (256, 8192)
    assert settings["step_dispatch"] == "compiled-graph"
    settings = dry_run(["--min-replicas", "1", "--max-replicas", "3", "--scale-up-queue", "4",
                        "--placement-strategy", "spread"], capsys)[1]
    assert (settings["min_replicas"], settings["max_replicas"], settings["scale_up_queue"]) == (1, 3, 4.0)
    assert settings["placement_strategy"] == "spread"
    assert defaults["quantize"] is None and dry_run(["--quantize", "int8"], capsys)[1]["quantize"] == "int8"
    assert defaults["tp_collectives"] == "auto"
    assert dry_run(["--tp-collectives", "torch"], capsys)[1]["tp_collectives"] == "torch"


@pytest.mark.parametrize("argv,flag", [
    (["--replicas", "0"], "--replicas"),
    (["--tp", "-1"], "--tp"),
    (["--port", "70000"], "--port"),
    (["--metrics-port", "-1"], "--metrics-port"),
    (["--tls-cert", "cert.pem"], "--tls-key"),
    (["--tls-key", "key.pem"], "--tls-cert"),
    (["--max-queued-requests", "0"], "--max-queued-requests"),
    (["--queue-timeout", "0"], "--queue-timeout"),
    (["--kv-cache-memory", "0"], "--kv-cache-memory"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--step-timeout", "0"], "--step-timeout"),
    (["--min-replicas", "1"], "--max-replicas"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas"),
    (["--min-replicas", "1", "--max-replicas", "2", "--scale-window", "-1"], "--scale-"),
    (["--max-num-seqs", "128", "--max-num-batched-tokens", "64"], "--max-num-batched-tokens"),
    (["--quantize", "int8", "--device", "cuda"], "--quantize"),
])
def test_dry_run_rejects_bad_values_naming_the_flag(argv, flag, capsys):
    code, settings, err = dry_run(argv, capsys)
    assert code == 2 and settings is None
    assert err.startswith("gemma-dist: error: ") and flag in err


def test_dry_run_rejects_an_unknown_device(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--device", "tpu", "--dry-run"])
    assert exit_info.value.code == 2 and "--device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--quantize", "int4", "--dry-run"])
    assert exit_info.value.code == 2 and "--quantize" in capsys.readouterr().err


def test_dry_run_starts_no_ray():
    code = ("import json, sys; from gemma_dist.cli import main; rc = main(['serve', '--dry-run']); "
            "print(json.dumps({'rc': rc, 'ray': 'ray' in sys.modules, 'grpc': 'grpc' in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"rc": 0, "ray": False, "grpc": False}


def test_serve_reuses_the_validation_before_touching_ray():
    from gemma_dist.server.serve import serve

    args = build_parser().parse_args(["serve", "--replicas", "0"])
    with pytest.raises(ValueError, match="--replicas"):
        serve(args)
