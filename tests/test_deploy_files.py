"""(Over 500 lines: the static checks and the runs share one set of Dockerfile and compose
parsers.) The deployment files (``Dockerfile``, ``.dockerignore``, ``deploy/``) checked without a
container engine: this machine has none, so the image is not built here (docs/operating.md,
"What was checked here and how"). What can be checked is:

* the Dockerfiles copy files that exist and that ``.dockerignore`` lets into the build context,
  every source folder of the wheel included; a non-root user, a health check, SIGTERM, the
  ports the configs bind;
* the compose files parse, mount files that exist at the paths their commands read, wire the
  gateway to the worker's service name and port, and Prometheus to both HTTP ports;
* the configs load and the policies pass ``tandem policy check``;
* (integration) the exact commands the image and the compose files run, with the exact config
  files in the image's layout (``/srv/tandem`` → a temporary folder; binds moved to loopback
  and free ports), start, answer ``/health``, ``/ready`` and ``/metrics``, pass the image's
  health check script, and exit 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tandem.cloud.config import load_worker_config
from tandem.router.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [ROOT / "Dockerfile", DEPLOY / "cuda.Dockerfile"]
IMAGE_DIR = "/srv/tandem"  # the image's WORKDIR: configs, models/, state/


# --- Dockerfile and .dockerignore -----------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str, str]]:
    """``(stage, INSTRUCTION, arguments)`` per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out, stage = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            stage = m.group(1) if m else args
        out.append((stage, op, args.strip()))
    return out


def copies(path: Path) -> list[tuple[list[str], str]]:
    """``(sources, destination)`` of each COPY/ADD from the build context (not ``--from``)."""
    out = []
    for _, op, args in instructions(path):
        if op not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus ``**``) as a regex over a path."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        rules.append((keep, _pattern_regex(line.lstrip("!").strip("/"))))
    return rules


def in_context(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context holds ``rel`` (relative to the root): as Docker decides it,
    the last pattern that matches the path or one of its parent folders wins."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for keep, rx in rules:
        if any(rx.match(p) for p in prefixes):
            excluded = not keep
    return not excluded


def package_dirs() -> list[str]:
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(set(meta["tool"]["setuptools"]["package-dir"].values()))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_context(dockerfile: Path) -> None:
    rules = dockerignore_rules()
    sources = [s for srcs, _ in copies(dockerfile) for s in srcs]
    assert sources, f"{dockerfile} copies nothing"
    for src in sources:
        assert (ROOT / src).exists(), f"{dockerfile.name} copies {src}, which does not exist"
        assert in_context(src, rules), f"{dockerfile.name} copies {src}: .dockerignore drops it"
        if (ROOT / src).is_dir():
            files = [p for p in (ROOT / src).rglob("*") if p.is_file()]
            kept = [p for p in files if in_context(str(p.relative_to(ROOT)), rules)]
            assert kept, f"{src}: .dockerignore keeps none of its files"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_wheel_gets_every_source_file(dockerfile: Path) -> None:
    """A non-editable install needs every package folder of pyproject.toml in the image, and
    all of its modules and package data (the scenario YAML files) in the build context."""
    rules = dockerignore_rules()
    copied = {s.strip("/") for srcs, _ in copies(dockerfile) for s in srcs}
    for name in ("pyproject.toml", "README.md"):
        assert name in copied, f"{dockerfile.name} does not copy {name} (pip needs it)"
    for d in package_dirs():
        top = d.split("/")[0]
        assert top in copied, f"{dockerfile.name} does not copy {top}/ (package dir {d})"
        for f in (ROOT / d).glob("*"):
            if f.suffix in (".py", ".yaml") and f.is_file():
                rel = str(f.relative_to(ROOT))
                assert in_context(rel, rules), f".dockerignore drops {rel}"


def test_dockerignore_keeps_the_rest_out() -> None:
    rules = dockerignore_rules()
    for rel in (
        "tests/conftest.py",
        "venv/bin/python",
        "build/lib/x.py",
        ".git/HEAD",
        "benchmarks/common.py",
        "examples/models/edge-int8.onnx",
        "deploy/multi-host/keys/worker.key_secret",
        "cloud/__pycache__/worker.pyc",
    ):
        assert not in_context(rel, rules), f".dockerignore lets {rel} into the image's context"


def _last(ops: list[tuple[str, str, str]], op: str, stage: str) -> str | None:
    found = [a for s, o, a in ops if o == op and s == stage]
    return found[-1] if found else None


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_image_is_non_root_probed_and_drains(dockerfile: Path) -> None:
    ops = instructions(dockerfile)
    stages = [s for s, o, _ in ops if o == "FROM"]
    for stage in {s for s in stages if s != "builder"}:
        user = _last(ops, "USER", stage)
        assert user not in (None, "root", "0"), f"stage {stage} runs as {user}"
    assert _last(ops, "STOPSIGNAL", "runtime") == "SIGTERM"
    health = _last(ops, "HEALTHCHECK", "runtime")
    assert health and "tandem-healthcheck" in health
    # the script the health check runs is the one in the repository (tested below)
    assert (["deploy/healthcheck.py"], "/usr/local/bin/tandem-healthcheck") in copies(dockerfile)
    exposed = {int(p) for p in (_last(ops, "EXPOSE", "runtime") or "").split()}
    worker = load_worker_config(DEPLOY / "worker.yaml")
    assert _port(worker.bind) in exposed and _port(worker.http.bind) in exposed
    compose = _compose()
    assert _arg(compose["services"]["gateway"]["command"], "--port") in {str(p) for p in exposed}
    assert json.loads(_last(ops, "ENTRYPOINT", "runtime")) == ["tandem"]
    cmd = json.loads(_last(ops, "CMD", "runtime"))
    assert cmd[:2] == ["cloud", "serve"] and "--insecure" not in cmd  # the safe default
    assert (["deploy/worker.yaml", "deploy/gateway-policy.yaml"], f"{IMAGE_DIR}/") in copies(
        dockerfile
    )
    assert _arg(cmd, "--config") == f"{IMAGE_DIR}/worker.yaml"


# --- compose files, configs, Prometheus -----------------------------------------------------


def _compose(path: Path = DEPLOY / "compose.yaml") -> dict:
    return yaml.safe_load(path.read_text())


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _port(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


def _mounts(service: dict, base: Path) -> dict[str, Path]:
    """A service's bind mounts: container path -> host path (named volumes left out)."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            out[dst] = (base / src).resolve()
    return out


def _image_path(container_path: str) -> str:
    assert container_path.startswith(IMAGE_DIR + "/"), container_path
    return container_path[len(IMAGE_DIR) + 1 :]


def test_compose_mounts_existing_files_where_the_commands_read_them() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"worker", "gateway", "prometheus"} <= set(services)
    dockerfile_stages = {s for s, o, _ in instructions(ROOT / "Dockerfile") if o == "FROM"}
    for name, svc in services.items():
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
            assert svc["build"]["target"] in dockerfile_stages
        for dst, src in _mounts(svc, DEPLOY).items():
            assert src.exists(), f"service {name} mounts {src} at {dst}: missing"
    worker, gateway = services["worker"], services["gateway"]
    assert _mounts(worker, DEPLOY)[_arg(worker["command"], "--config")] == (DEPLOY / "worker.yaml")
    assert _mounts(gateway, DEPLOY)[_arg(gateway["command"], "--policy")] == (
        DEPLOY / "gateway-policy.yaml"
    )
    prom = services["prometheus"]
    assert _mounts(prom, DEPLOY)["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"


def test_compose_network_exposes_only_what_it_means_to() -> None:
    compose = _compose()
    services = compose["services"]
    assert compose["networks"]["backend"]["internal"] is True
    assert "ports" not in services["worker"]  # its plain-text ZeroMQ port stays private
    assert services["worker"]["networks"] == ["backend"]
    for name in ("gateway", "prometheus"):
        for p in services[name]["ports"]:
            assert p.startswith("127.0.0.1:"), f"{name} publishes {p} beyond this host"
    # --insecure is there because the network is private, and only there
    assert "--insecure" in services["worker"]["command"]


def test_gateway_and_prometheus_point_at_the_compose_services() -> None:
    services = _compose()["services"]
    worker = load_worker_config(DEPLOY / "worker.yaml")
    policy = load_policy(DEPLOY / "gateway-policy.yaml")
    zmq_port, http_port = _port(worker.bind), _port(worker.http.bind)
    assert str(zmq_port) in services["worker"]["expose"]
    assert str(http_port) in services["worker"]["expose"]
    for task in policy.tasks.values():
        assert task.cloud is not None
        assert task.cloud.all_endpoints == [f"tcp://worker:{zmq_port}"]
        assert task.cloud.model in worker.models
    gateway_port = _arg(services["gateway"]["command"], "--port")
    assert services["gateway"]["environment"]["TANDEM_HTTP_PORT"] == gateway_port
    assert services["worker"]["environment"]["TANDEM_HTTP_PORT"] == str(http_port)
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {f"worker:{http_port}", f"gateway:{gateway_port}"}
    assert all(job["metrics_path"] == "/metrics" for job in prom["scrape_configs"])


def test_multi_host_files_agree() -> None:
    """Two workers behind one Curve identity, a robot's policy listing both, Prometheus
    scraping both; the worker compose file mounts the keys where the config reads them."""
    mh = DEPLOY / "multi-host"
    worker = load_worker_config(mh / "worker.yaml")
    assert worker.curve is not None and not worker.insecure
    policy = load_policy(mh / "robot-policy.yaml")
    cloud = policy.tasks["digits"].cloud
    assert cloud is not None and cloud.endpoints is not None and len(cloud.endpoints) == 2
    assert cloud.curve_keys is not None and cloud.model in worker.models
    hosts = [e.removeprefix("tcp://").rsplit(":", 1) for e in cloud.endpoints]
    assert {int(p) for _, p in hosts} == {_port(worker.bind)}
    prom = yaml.safe_load((mh / "prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {f"{h}:{_port(worker.http.bind)}" for h, _ in hosts}
    svc = _compose(mh / "compose.worker.yaml")["services"]["worker"]
    mounts = _mounts(svc, mh)
    assert mounts[_arg(svc["command"], "--config")] == mh / "worker.yaml"
    assert "--insecure" not in svc["command"]
    for key_path in (worker.curve.secret_key, worker.curve.allowed_clients):
        rel = str(key_path.relative_to(mh))
        assert f"{IMAGE_DIR}/{rel}" in mounts, f"compose.worker.yaml does not mount {rel}"


def test_policies_pass_tandem_policy_check() -> None:
    files = [DEPLOY / "gateway-policy.yaml", DEPLOY / "multi-host" / "robot-policy.yaml"]
    r = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "policy", "check", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": OK") == len(files)


@pytest.mark.parametrize("compose", ["compose.yaml", "multi-host/compose.worker.yaml"])
def test_docker_compose_validates(compose: str) -> None:
    """``docker compose config`` validates against the Compose schema offline (no daemon)."""
    exe = shutil.which("docker-compose")
    cmd = [exe, "-f", str(DEPLOY / compose), "config", "-q"] if exe else None
    if cmd is None and shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        cmd = ["docker", "compose", "-f", str(DEPLOY / compose), "config", "-q"]
        if probe.returncode != 0:
            cmd = None
    if cmd is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    env = {**os.environ, "TANDEM_HOST_IP": "10.0.0.11"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr


# --- the image's commands, run for real -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_env() -> dict[str, str]:
    """The runtime stage's ENV (offline flags, no progress bars), on top of this process's."""
    env = dict(os.environ)
    for _, op, args in instructions(ROOT / "Dockerfile"):
        if op == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                if key not in ("PATH", "TANDEM_CACHE_DIR", "TANDEM_HTTP_PORT"):
                    env[key] = value
    return env


def _tandem(cmd: list[str], mapping: dict[str, str], extra: list[str]) -> list[str]:
    """A container command as a local one: ``tandem`` is this interpreter's CLI, and the
    image's paths are the temporary layout's."""
    return [sys.executable, "-m", "tandem.cli", *(mapping.get(a, a) for a in cmd), *extra]


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode} while starting"
        try:
            if _get(url, 2.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not 200 after {timeout_s:.0f} s")


def _healthcheck(port: int, path: str = "/health") -> int:
    env = {**os.environ, "TANDEM_HTTP_PORT": str(port), "TANDEM_HEALTH_PATH": path}
    script = str(DEPLOY / "healthcheck.py")
    return subprocess.run([sys.executable, script], env=env, timeout=30).returncode


def _stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    proc.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("no exit within 60 s of SIGTERM") from None


@pytest.fixture(scope="module")
def image_layout(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Path:
    """``/srv/tandem`` as the "reference" image has it: models/ with digits-cloud and
    chat-cloud registered by ``models add`` (the registry function behind it), the edge GGUF
    beside them, state/; the deploy configs are copied in by each test."""
    from tandem.reference.chat_pair import build_chat_pair
    from tandem.runtime.registry import add_model

    root = tmp_path_factory.mktemp("srv-tandem")
    models = root / "models"
    add_model(models, tiny_models / "cloud-fp32.onnx", name="digits-cloud")
    pair = build_chat_pair()  # the cache's copy when built (seconds otherwise)
    add_model(models, pair["chat-cloud"], name="chat-cloud")
    shutil.copy(pair["chat-edge"], models / "chat-edge-q8_0.gguf")
    shutil.copy(tiny_models / "edge-int8.onnx", models / "edge-int8.onnx")
    (root / "state").mkdir()
    return root


@pytest.mark.integration
@pytest.mark.slow
def test_compose_worker_serves_probes_and_drains(image_layout: Path, tmp_path: Path) -> None:
    """The compose worker's exact command and config (models: digits-cloud and chat-cloud)."""
    from tandem.runtime.client import CloudClient

    shutil.copy(DEPLOY / "worker.yaml", image_layout / "worker.yaml")
    cmd = _compose()["services"]["worker"]["command"]
    port, ready = _free_port(), tmp_path / "ready"
    mapping = {f"{IMAGE_DIR}/worker.yaml": str(image_layout / "worker.yaml")}
    extra = ["--bind", "tcp://127.0.0.1:*", "--http", f"127.0.0.1:{port}"]
    logs = tmp_path / "stderr"
    with logs.open("wb") as err:
        proc = subprocess.Popen(
            _tandem(cmd, mapping, [*extra, "--ready-file", str(ready)]),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_image_env(),
        )
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/ready")
        status, body = _get(f"http://127.0.0.1:{port}/ready")
        models = json.loads(body)["models"]
        assert {"digits-cloud", "chat-cloud"} <= set(models)
        assert all(m["ready"] for m in models.values())
        assert _get(f"http://127.0.0.1:{port}/health")[0] == 200
        status, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"tandem_" in metrics
        assert _healthcheck(port, "/ready") == 0  # what the compose worker's probe runs
        with CloudClient(ready.read_text()) as client:
            info = client.health(10.0)
        assert {"digits-cloud", "chat-cloud"} <= set(info["models"])
    finally:
        code = _stop(proc)
    assert code == 0
    assert _healthcheck(port) == 1  # the probe fails once nothing answers
    lines = [ln for ln in logs.read_text().splitlines() if ln.startswith("{")]
    assert lines and all(isinstance(json.loads(ln), dict) for ln in lines)  # --log-format json


@pytest.mark.integration
@pytest.mark.slow
def test_compose_gateway_serves_probes_and_answers(image_layout: Path) -> None:
    """The compose gateway's exact command and policy; its worker ("worker", a compose name)
    does not resolve here, so the request is a private one (answered on the device)."""
    shutil.copy(DEPLOY / "gateway-policy.yaml", image_layout / "gateway-policy.yaml")
    cmd = list(_compose()["services"]["gateway"]["command"])
    port = _free_port()
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    mapping = {f"{IMAGE_DIR}/gateway-policy.yaml": str(image_layout / "gateway-policy.yaml")}
    proc = subprocess.Popen(
        _tandem(cmd, mapping, []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_image_env(),
    )
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/ready")
        assert _healthcheck(port) == 0  # TANDEM_HTTP_PORT as the compose gateway sets it
        status, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"tandem_" in metrics
        body = json.dumps(
            {"model": "chat", "prompt": "hi", "max_tokens": 4, "tandem": {"tags": ["private"]}}
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["tandem"]["tier"] == "edge"
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        code = _stop(proc)
    assert code == 0


@pytest.mark.integration
def test_image_default_command_refuses_an_open_bind_without_curve(tmp_path: Path) -> None:
    """The image's CMD as it is (0.0.0.0, no Curve, no --insecure) must refuse to start."""
    shutil.copy(DEPLOY / "worker.yaml", tmp_path / "worker.yaml")
    cmd = json.loads(_last(instructions(ROOT / "Dockerfile"), "CMD", "runtime"))
    mapping = {f"{IMAGE_DIR}/worker.yaml": str(tmp_path / "worker.yaml")}
    extra = ["--http", f"127.0.0.1:{_free_port()}"]  # never an open port on the test machine
    r = subprocess.run(
        _tandem(cmd, mapping, extra), capture_output=True, text=True, timeout=120, env=_image_env()
    )
    assert r.returncode != 0
    assert "curve" in r.stderr and "--insecure" in r.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_multi_host_worker_serves_curve_clients(image_layout: Path, tmp_path: Path) -> None:
    """deploy/multi-host/worker.yaml with keys made by ``tandem keys generate``, run by the
    command of compose.worker.yaml: a robot with an allowed key gets its health answer."""
    from tandem.runtime.curve import generate_keypair

    host = tmp_path / "srv"
    shutil.copytree(image_layout / "models", host / "models")
    shutil.copy(DEPLOY / "multi-host" / "worker.yaml", host / "worker.yaml")
    generate_keypair(host / "keys", "worker")
    robot_public, robot_secret = generate_keypair(tmp_path / "robot", "robot-7")
    (host / "keys" / "clients").mkdir()
    shutil.copy(robot_public, host / "keys" / "clients")
    svc = _compose(DEPLOY / "multi-host" / "compose.worker.yaml")["services"]["worker"]
    port, ready = _free_port(), tmp_path / "ready"
    mapping = {f"{IMAGE_DIR}/worker.yaml": str(host / "worker.yaml")}
    extra = [
        "--bind",
        "tcp://127.0.0.1:*",
        "--http",
        f"127.0.0.1:{port}",
        "--ready-file",
        str(ready),
    ]
    proc = subprocess.Popen(
        _tandem(svc["command"], mapping, extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_image_env(),
    )
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/ready")
        health = [
            sys.executable,
            "-m",
            "tandem.cli",
            "cloud",
            "health",
            ready.read_text(),
            "--timeout-ms",
            "10000",
        ]
        keys = [
            "--client-key",
            str(robot_secret),
            "--server-key",
            str(host / "keys" / "worker.key"),
        ]
        r = subprocess.run([*health, *keys], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "digits-cloud" in r.stdout
    finally:
        code = _stop(proc)
    assert code == 0
