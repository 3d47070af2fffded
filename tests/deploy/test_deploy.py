"""The deployment files (docker/, docker-compose*.yml, systemd/, .dockerignore) against the
code they start.

Every service command in them is parsed by that service's real argparse parser, under the
environment the service would see, and the resulting config is checked: a renamed flag,
an environment variable common/env.py does not read, or addresses that do not meet (a
worker advertising a name nobody resolves, a scheduler port nobody dials) fail here.
Where the validators exist, `docker compose config` / `docker-compose config` and
`systemd-analyze verify` check the files too; without them those tests skip, saying why.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import http.server
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest
import yaml
import zmq

from ferry.common import wire
from ferry.services.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_GPU = "docker-compose.yml"
COMPOSE_CPU = "docker-compose.cpu.yml"
COMPOSE_FILES = (COMPOSE_GPU, COMPOSE_CPU)
DOCKERFILES = ("docker/Dockerfile", "docker/Dockerfile.cpu")
HEALTHCHECK_PATH = "/opt/ferry/healthcheck.py"  # where both images put docker/healthcheck.py
FERRY_BIN = "/opt/ferry/.venv/bin/ferry"  # the systemd units' ExecStart binary
UNITS = ("ferry-scheduler.service", "ferry-gateway.service", "ferry-worker@.service")
# Environment names the deployment files may set that Ferry itself does not read.
THIRD_PARTY_ENV = {"HOME", "PATH", "PYTHONUNBUFFERED", "TRITON_CACHE_DIR", "DEBIAN_FRONTEND",
                   "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}


# ---- what the code accepts ----------------------------------------------------------------


def ferry_env_names() -> set[str]:
    """Every FERRY_* name common/env.py reads (string constants of that module)."""
    tree = ast.parse((ROOT / "common" / "env.py").read_text())
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and re.fullmatch(r"FERRY_[A-Z0-9_]+", node.value)}


class _Strict(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of printing usage and exiting
        raise ValueError(f"{self.prog}: {message}")


@contextlib.contextmanager
def ferry_environ(environ: dict[str, str]) -> Iterator[None]:
    """os.environ with no FERRY_* variable but those of `environ` (the test runner's own
    must not leak into the defaults the parsers read)."""
    with mock.patch.dict(os.environ):
        for name in [n for n in os.environ if n.startswith("FERRY_")]:
            del os.environ[name]
        os.environ.update(environ)
        yield


def parse_service(argv: list[str], environ: dict[str, str]):
    """`ferry <argv>` as the real CLI parses it under `environ`: (namespace, config), the
    config being what the service builds from its flags. Raises ValueError on a bad flag."""
    service = argv[0]
    assert service in COMMANDS, f"`ferry {service}` is not a ferry command"
    with ferry_environ(environ):
        module = importlib.import_module(COMMANDS[service][0])
        parser = _Strict(prog=f"ferry {service}")
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        config = module.config_from_args(args) if hasattr(module, "config_from_args") else None
    return args, config


def port_of(addr: str) -> int:
    port = urlparse(addr).port
    assert port is not None, addr
    return port


def host_of(addr: str) -> str:
    return urlparse(addr).hostname or ""


def test_parse_service_rejects_unknown_flags():
    # The checks below rely on this: a flag the service lost must be an error.
    with pytest.raises(ValueError, match="unrecognized arguments: --no-such-flag"):
        parse_service(["worker", "--device", "cpu", "--no-such-flag", "1"], {})
    assert "FERRY_HOST" in ferry_env_names() and "FERRY_SCHEDULER_ADDR" in ferry_env_names()


# ---- Dockerfiles, .dockerignore ---------------------------------------------------------


def dockerfile_instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's final stage, continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / path).read_text())
    rows = [line.strip().split(None, 1) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]
    rows = [(r[0].upper(), r[1] if len(r) > 1 else "") for r in rows]
    last_from = max(i for i, (ins, _) in enumerate(rows) if ins == "FROM")
    return rows[last_from:]


def dockerfile_env(path: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, rest in dockerfile_instructions(path):
        if ins == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(rest))
    return env


@pytest.mark.parametrize("path", DOCKERFILES)
def test_dockerfile_final_stage(path):
    rows = dockerfile_instructions(path)
    final = {ins: rest for ins, rest in rows}  # the last of each instruction
    assert final["ENTRYPOINT"] == '["ferry"]'
    assert final["USER"] not in ("root", "0"), "services must not run as root"
    assert HEALTHCHECK_PATH in final["HEALTHCHECK"]
    assert ("COPY", f"docker/healthcheck.py {HEALTHCHECK_PATH}") in rows
    assert ("COPY", "--from=build /opt/ferry/.venv /opt/ferry/.venv") in rows
    assert final["CMD"] == '["up"]' and "up" in COMMANDS
    env = dockerfile_env(path)
    assert env["PATH"].startswith("/opt/ferry/.venv/bin:")
    assert env["FERRY_BIND_HOST"] == "0.0.0.0"  # reachable from other containers
    unknown = {n for n in env if n.startswith("FERRY_")} - ferry_env_names()
    assert not unknown, f"{path} sets variables common/env.py does not read: {unknown}"
    assert not set(env) - ferry_env_names() - THIRD_PARTY_ENV
    # Every port a service listens on by default is declared.
    exposed = set(final["EXPOSE"].split())
    assert {str(p) for p in default_ports().values()} <= exposed


def default_ports() -> dict[str, int]:
    """What each service listens on with no flag and no FERRY_* variable."""
    sched, _ = parse_service(["scheduler"], {})
    gw, gw_config = parse_service(["gateway"], {})
    worker, _ = parse_service(["worker", "--device", "cpu"], {})
    return {"gateway http": gw_config.http_port, "gateway sdk": gw.sdk_port,
            "gateway inbox": gw.inbox_port, "scheduler inbox": sched.port,
            "scheduler admin": sched.admin_port, "scheduler metrics": sched.metrics_port,
            "worker inbox": worker.port}


def test_default_ports():
    assert default_ports() == {
        "gateway http": 8000, "gateway sdk": 8001, "gateway inbox": 5602,
        "scheduler inbox": 5600, "scheduler admin": 5601, "scheduler metrics": 5603,
        "worker inbox": 5700}


def test_dockerfiles_install_from_the_lock_files():
    """Each image installs every package at its lock's version, torch first (a code change
    must not download torch again), on the Python version the lock was resolved for."""
    for dockerfile, lock, python in (("docker/Dockerfile.cpu", "requirements/cpu.lock", "3.11"),
                                     ("docker/Dockerfile", "requirements/gpu.lock", "3.12")):
        text = (ROOT / dockerfile).read_text()
        installs = [line for line in text.splitlines() if re.match(r"RUN pip install", line)]
        assert len(installs) == 2, (dockerfile, installs)
        for line in installs:
            assert f"-c {lock}" in line, f"{dockerfile}: {line!r} ignores {lock}"
        assert installs[0].endswith(" torch"), installs[0]
        assert text.index(installs[0]) < text.index("COPY . .") < text.index(installs[1])
        assert f"COPY {lock} requirements/" in text
        header = (ROOT / lock).read_text().splitlines()[1]
        assert f"--python-version {python}" in header, (lock, header)
    cpu = (ROOT / "docker/Dockerfile.cpu").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-", cpu, re.M)
    assert "download.pytorch.org/whl/cpu" in cpu  # torch==X+cpu is on PyTorch's index
    cuda = (ROOT / "docker/Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-ubuntu24\.04$", cuda, re.M)
    assert 'RUN pip install -c requirements/gpu.lock ".[gpu]"' in cuda


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: patterns are anchored at the context's root, the last one matching
    the path or one of its parent directories decides, `!` re-includes; `*` and `?` stay
    within a path segment, `**/` matches any number of directories."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "README.md", "docker/healthcheck.py", "requirements/cpu.lock",
              "requirements/gpu.lock",
              "services/worker/profiles/tiny-cpu.json", "services/worker/entry.py", "common/env.py",
              "kernels/attention_torch.py", "ferry/client.py", "bench/trace.py"]
    for rel in needed:
        assert not dockerignored(rel, patterns), f".dockerignore drops {rel}, the image needs it"
    dropped = [".venv/bin/python", ".git/HEAD", "bench/results/tmp/run.json",
               "bench/results/h200/engine_h200.log", ".whl/pyzmq-27.3.0.whl",
               "services/__pycache__/cli.cpython-312.pyc", "tests/unit/test_wire.py",
               ".pytest_cache/v/cache", "ferry_serve.egg-info/PKG-INFO", "x/y/a.whl"]
    for rel in dropped:
        assert dockerignored(rel, patterns), f".dockerignore lets {rel} into the context"


# ---- docker-compose*.yml ----------------------------------------------------------------


def interpolate(value, environ: dict[str, str]):
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, default = match.group("op"), match.group("default") or ""
        if op == ":-":
            return environ.get(name) or default
        if op == "-":
            return environ.get(name, default)
        return environ.get(name, "")

    pattern = (r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
               r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
    if isinstance(value, str):
        return re.sub(pattern, one, value)
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    return value


def load_compose(name: str) -> dict:
    """The compose file with anchors merged and variables at their defaults."""
    return interpolate(yaml.safe_load((ROOT / name).read_text()), {})


def service_env(compose: dict, name: str) -> dict[str, str]:
    """What the service's process sees: its image's ENV, then the compose environment."""
    service = compose["services"][name]
    env = dockerfile_env(service["build"]["dockerfile"])
    env.update({k: str(v) for k, v in service.get("environment", {}).items()})
    return env


def service_config(compose: dict, name: str):
    return parse_service(compose["services"][name]["command"], service_env(compose, name))


def published(service: dict) -> dict[int, int]:
    """container port -> host port of `ports:` entries like "127.0.0.1:5601:5601"."""
    out = {}
    for entry in service.get("ports", []):
        *host, container = str(entry).split(":")
        out[int(container.split("/")[0])] = int(host[-1])
    return out


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_services_use_real_flags_and_variables(name):
    compose = load_compose(name)
    services = compose["services"]
    assert set(services) == {"keys", "scheduler", "gateway", "worker-0", "worker-1"}
    known = ferry_env_names()
    for svc, spec in services.items():
        assert (ROOT / spec["build"]["dockerfile"]).is_file()
        assert spec["build"]["context"] == "."
        unknown = set(spec.get("environment", {})) - known
        assert not unknown, f"{name} {svc}: common/env.py does not read {unknown}"
        service_config(compose, svc)  # raises on a flag the service does not have
        assert spec["command"][0] == ("worker" if svc.startswith("worker") else svc)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_services_speak_with_keys_the_keys_service_makes(name, tmp_path):
    """CURVE is on: every service has FERRY_KEYS_DIR on the keys volume, and the identity
    it will load (FERRY_KEY_NAME, else its role) is one `ferry keys init` makes with the
    keys service's own arguments, of the service's role (workers: bound to themselves)."""
    from ferry.common.security import check_role, load_keys

    compose = load_compose(name)
    services = compose["services"]
    keys_cmd = services["keys"]["command"]
    assert keys_cmd[:3] == ["keys", "init", "/var/lib/ferry/keys"] and "--if-missing" in keys_cmd
    assert services["keys"]["restart"] == "no"
    assert services["keys"]["volumes"] == ["ferry-keys:/var/lib/ferry/keys"]
    made = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "ferry.services.cli", *keys_cmd[:2], str(made),
                          *keys_cmd[3:]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for svc, spec in services.items():
        if svc == "keys":
            continue
        environ = service_env(compose, svc)
        assert environ["FERRY_KEYS_DIR"] == "/var/lib/ferry/keys", svc
        assert "ferry-keys:/var/lib/ferry/keys:ro" in spec["volumes"], svc
        assert spec["depends_on"]["keys"] == {"condition": "service_completed_successfully"}
        role = spec["command"][0]
        keys = load_keys(str(made), environ.get("FERRY_KEY_NAME") or role)
        check_role(keys, role)
        if role == "worker":
            assert keys.own.instance_id == environ["FERRY_INSTANCE_ID"] == svc
        # the health check speaks to the scheduler with the admin key
        check_role(load_keys(str(made), "admin"), "admin")


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_addresses_meet(name):
    """Each address a service dials is one another service binds, under a name that
    resolves on the compose network (service name = hostname = FERRY_HOST)."""
    compose = load_compose(name)
    services = compose["services"]
    sched_args, sched = service_config(compose, "scheduler")
    gw_args, gw = service_config(compose, "gateway")
    for svc, spec in services.items():
        assert spec["hostname"] == svc
        if svc != "keys":  # makes the keys and exits: nobody dials it
            assert service_env(compose, svc)["FERRY_HOST"] == svc
    # The scheduler binds everywhere, on the ports the others dial.
    assert sched.inbox.bind == f"tcp://0.0.0.0:{sched_args.port}"
    assert sched.admin.bind == f"tcp://0.0.0.0:{sched_args.admin_port}"
    # The gateway: its inbox reaches workers and scheduler; its client ports are published.
    assert gw.inbox.bind == f"tcp://0.0.0.0:{gw_args.inbox_port}"
    assert gw.inbox.advertise == f"tcp://gateway:{gw_args.inbox_port}"
    assert gw.http_host == "0.0.0.0"
    assert published(services["gateway"]) == {gw.http_port: 8000, gw_args.sdk_port: 8001}
    dialers = {"gateway": gw.scheduler_addr}
    instance_ids = set()
    for svc in ("worker-0", "worker-1"):
        args, worker = service_config(compose, svc)
        assert worker.inbox.bind == f"tcp://0.0.0.0:{args.port}"
        # Peers dial this worker here, and its migration stores are advertised on this host.
        assert worker.inbox.advertise == f"tcp://{svc}:{args.port}"
        assert worker.instance_id == svc
        instance_ids.add(worker.instance_id)
        assert worker.device == ("cpu" if name == COMPOSE_CPU else "cuda")
        dialers[svc] = worker.scheduler_addr
        # The worker's health check asks the scheduler's admin endpoint.
        admin = service_env(compose, svc)["FERRY_SCHEDULER_ADMIN_ADDR"]
        assert (host_of(admin), port_of(admin)) == ("scheduler", sched_args.admin_port)
    assert len(instance_ids) == 2
    for svc, addr in dialers.items():
        assert (host_of(addr), port_of(addr)) == ("scheduler", sched_args.port), svc
    assert published(services["scheduler"]) == {sched_args.admin_port: 5601,
                                                sched_args.metrics_port: 5603}
    # loopback all the same
    assert services["scheduler"]["ports"] == ["127.0.0.1:5601:5601", "127.0.0.1:5603:5603"]
    # /metrics, reachable on the compose network (Prometheus there scrapes scheduler:5603)
    assert sched_args.metrics_port == 5603 and sched_args.metrics_host == "0.0.0.0"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_health_order_and_cache(name):
    compose = load_compose(name)
    services = compose["services"]
    healthcheck = _load_healthcheck_module()
    for svc, spec in services.items():
        if svc == "keys":  # a one-shot job: no health check, no restart
            continue
        assert spec["healthcheck"]["test"] == ["CMD", "python", HEALTHCHECK_PATH]
        assert spec["init"] is True and spec["restart"] == "unless-stopped"
        for dep, cond in spec.get("depends_on", {}).items():
            if dep == "keys":
                assert cond == {"condition": "service_completed_successfully"}
                continue
            assert cond == {"condition": "service_healthy"}
            assert "healthcheck" in services[dep]
    assert set(services["scheduler"]["depends_on"]) == {"keys"}
    for svc in ("gateway", "worker-0", "worker-1"):
        assert set(services[svc]["depends_on"]) == {"keys", "scheduler"}
    # What docker/healthcheck.py will probe in each container.
    probes = {}
    for svc, spec in services.items():
        if svc == "keys":
            continue
        with ferry_environ(service_env(compose, svc)):
            probes[svc] = healthcheck.probe_for(spec["command"])
    assert probes["scheduler"] == healthcheck.Probe(kind="admin", target="tcp://127.0.0.1:5601")
    assert probes["gateway"] == healthcheck.Probe(kind="http",
                                                  target="http://127.0.0.1:8000/health")
    for svc in ("worker-0", "worker-1"):
        assert probes[svc] == healthcheck.Probe(kind="instance", target="tcp://scheduler:5601",
                                                instance_id=svc)
    # The gateway and the workers share one model cache (tiny is made once, under a lock).
    assert set(compose["volumes"]) == {"ferry-cache", "ferry-keys"}
    for svc in ("gateway", "worker-0", "worker-1"):
        cache = Path(service_env(compose, svc)["FERRY_MODEL_CACHE"])
        mounts = [v.split(":") for v in services[svc]["volumes"]]
        assert any(src == "ferry-cache" and cache.is_relative_to(dst) for src, dst, *_ in mounts)


def test_compose_gpu_workers_get_one_gpu_each():
    services = load_compose(COMPOSE_GPU)["services"]
    gpus = []
    for svc in ("worker-0", "worker-1"):
        (device,) = services[svc]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "count" not in device, "count: 1 gives every worker the same first GPU"
        gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)) == 2
    for svc in ("scheduler", "gateway"):
        assert "deploy" not in services[svc]


def test_compose_cpu_file_is_the_gpu_file_without_gpus():
    """docker-compose.cpu.yml may differ from docker-compose.yml only in the image, the
    workers' device and what exists for GPUs."""
    gpu, cpu = load_compose(COMPOSE_GPU), load_compose(COMPOSE_CPU)
    gpu_only = ("deploy", "shm_size", "ulimits")
    for svc, spec in gpu["services"].items():
        expected = {k: v for k, v in spec.items() if k not in gpu_only}
        expected["image"] = "ferry:cpu"
        expected["build"] = {**spec["build"], "dockerfile": "docker/Dockerfile.cpu"}
        expected["command"] = ["cpu" if a == "cuda" else a for a in spec["command"]]
        assert cpu["services"][svc] == expected, svc
    assert cpu["volumes"] == gpu["volumes"]
    assert gpu["services"]["worker-0"]["image"] == "ferry:cuda"


def compose_command() -> list[str] | None:
    """`docker compose` (plugin) or `docker-compose` (v1), whichever can run `config`."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cmd in candidates:
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return cmd
    return None


def _compose_config(cmd: list[str], path: Path) -> subprocess.CompletedProcess:
    # `config` validates and interpolates without talking to a Docker engine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    return subprocess.run([*cmd, "-f", str(path), "config", "-q"], cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_config_validates(name):
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed "
                    "(apt-get install docker-compose)")
    result = _compose_config(cmd, ROOT / name)
    assert result.returncode == 0, f"{' '.join(cmd)} config rejects {name}:\n{result.stderr}"


def test_compose_validator_catches_a_broken_file(tmp_path):
    # Shows the validator test above can fail: the same file with a bad depends_on.
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    text = (ROOT / COMPOSE_CPU).read_text()
    broken = tmp_path / COMPOSE_CPU
    broken.write_text(text.replace("condition: service_healthy", "condition: when_ready", 1))
    result = _compose_config(cmd, broken)
    assert result.returncode != 0 and "when_ready" in result.stderr + result.stdout


# ---- docker/healthcheck.py --------------------------------------------------------------


@functools.cache
def _load_healthcheck_module():
    """docker/healthcheck.py, a script rather than a package module (the images copy it
    to HEALTHCHECK_PATH). Registered in sys.modules: its dataclass needs that."""
    name = "ferry_docker_healthcheck"
    spec = importlib.util.spec_from_file_location(name, ROOT / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_healthcheck_finds_the_service_behind_docker_init():
    hc = _load_healthcheck_module()
    assert hc.service_argv(["/sbin/docker-init", "--", "ferry", "worker", "--port", "5700"]) \
        == ["worker", "--port", "5700"]
    assert hc.service_argv(["/opt/ferry/.venv/bin/python", "/opt/ferry/.venv/bin/ferry",
                            "gateway"]) == ["gateway"]
    assert hc.service_argv(["sleep", "1"]) == []
    assert hc.probe_for([]) is None and hc.probe_for(["generate", "--json"]) is None
    with ferry_environ({"FERRY_BIND_HOST": "10.1.2.3"}):
        assert hc.probe_for(["up", "--http-port", "9000"]).target == "http://10.1.2.3:9000/health"
        # A worker without --instance-id / FERRY_INSTANCE_ID: <hostname>-<port>, as it does.
        probe = hc.probe_for(["worker", "--port", "5707"])
    assert probe.instance_id.endswith("-5707") and probe.kind == "instance"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_http_probe():
    hc = _load_healthcheck_module()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/health"
    try:
        assert hc.check(hc.Probe(kind="http", target=url))
        _Health.status = 503  # the gateway has no instance view yet
        assert not hc.check(hc.Probe(kind="http", target=url))
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
    assert not hc.http_ok(url, timeout_s=0.5)  # nobody listening


def test_healthcheck_scheduler_probes():
    """Against a fake scheduler admin endpoint answering one status request at a time."""
    hc = _load_healthcheck_module()
    load = wire.LoadFields(num_total_blocks=8, num_free_blocks=8, num_reserved_blocks=0,
                           num_running=0, num_waiting=0, head_demand_blocks=0,
                           waiting_demand_blocks=0, used_blocks_high=0, num_running_high=0,
                           num_migrations_in=0, num_migrations_out=0, draining=False,
                           step_time_ewma_s=0.0, num_preemptions=0)
    reply = wire.StatusReply(
        scheduler_epoch="e", dispatch_policy="llumnix", requests=(),
        num_migrations_committed=0, num_migrations_aborted=0,
        instances=tuple(wire.InstanceStatus(instance_id=i, inbox_addr="tcp://x:1", alive=alive,
                                            load=load, freeness=1.0, last_report_age_s=0.0)
                        for i, alive in (("worker-0", True), ("worker-1", False))))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    addr = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if router.poll(50):
                ident, *frames = router.recv_multipart()
                assert isinstance(wire.decode(frames, (wire.StatusRequest,)), wire.StatusRequest)
                router.send_multipart([ident, *wire.encode(reply)])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert hc.check(hc.Probe(kind="admin", target=addr))
        assert hc.check(hc.Probe(kind="instance", target=addr, instance_id="worker-0"))
        assert not hc.check(hc.Probe(kind="instance", target=addr, instance_id="worker-1"))
        assert not hc.check(hc.Probe(kind="instance", target=addr, instance_id="worker-9"))
    finally:
        stop.set()
        thread.join()
        router.close()
        ctx.term()
    assert hc.ask_status(addr, timeout_s=0.2) is None  # nobody answers any more


# ---- docs/deploy.md ----------------------------------------------------------------------


def test_deploy_doc_lists_every_port():
    """The port table names every default port, and the firewall table opens the
    scheduler's and the gateway's /metrics to Prometheus."""
    text = (ROOT / "docs/deploy.md").read_text()
    table = dict(re.findall(r"^\| (\d+)(?: \(\+N\))? \| ([^|]+) \|", text, re.M))
    for what, port in default_ports().items():
        assert str(port) in table, f"docs/deploy.md's port table lacks {port} ({what})"
    assert "/metrics" in table["5603"]
    firewall = re.findall(r"^\| (\w+) \| ([^|]+) \| ([^|]+) \|$", text, re.M)
    assert any(host == "scheduler" and "Prometheus" in who and "5603" in ports
               for host, who, ports in firewall)
    assert any(host == "gateway" and "Prometheus" in who and "8000" in ports
               for host, who, ports in firewall)


def test_deploy_doc_lists_every_variable():
    """The environment table of docs/deploy.md names exactly what common/env.py reads."""
    rows = re.findall(r"^\| `(FERRY_[A-Z0-9_]+)` \|", (ROOT / "docs/deploy.md").read_text(),
                      re.M)
    assert len(rows) == len(set(rows))
    assert set(rows) == ferry_env_names()


# ---- systemd/ ---------------------------------------------------------------------------


def read_unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)] in file order. Keys repeat (Environment=,
    EnvironmentFile=), which configparser would collapse."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", (ROOT / "systemd" / name).read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{name}: cannot read {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict, section: str, key: str) -> str:
    (value,) = values(unit, section, key)
    return value


def read_env_file(path: Path, *, uncomment: bool = False) -> dict[str, str]:
    """An EnvironmentFile=: KEY=VALUE lines, `#` comments, optional quotes. uncomment:
    also take commented-out assignments (`#KEY=VALUE`), the examples in the file."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if uncomment and re.match(r"#[A-Z_][A-Z0-9_]*=", line):
            line = line[1:]
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip().strip("\"'")
    return env


SPECIFIERS = {"%H": "node1", "%%": "%"}


def unit_exec(name: str, instance: str = "", env_files: dict[str, Path] | None = None,
              uncomment: bool = False) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the unit's ExecStart as systemd runs it: specifiers filled
    in, Environment= then each EnvironmentFile= (the later wins), `${VAR}` replaced within
    a word and a lone `$VAR` split into words. env_files maps an EnvironmentFile= path
    (after specifiers) to the file standing in for it; others are absent (all are `-`)."""
    unit = read_unit(name)

    def spec(text: str) -> str:  # a specifier not simulated here fails (KeyError)
        return re.sub(r"%.", lambda m: {**SPECIFIERS, "%i": instance}[m.group(0)], text)

    env: dict[str, str] = {}
    for assignment in values(unit, "Service", "Environment"):
        env.update(word.split("=", 1) for word in shlex.split(spec(assignment)))
    for path in values(unit, "Service", "EnvironmentFile"):
        assert path.startswith("-"), f"{name}: {path} should be optional (-)"
        stand_in = (env_files or {}).get(spec(path[1:]))
        if stand_in is not None:
            env.update(read_env_file(stand_in, uncomment=uncomment))
    argv = []
    for word in shlex.split(spec(one(unit, "Service", "ExecStart"))):
        lone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if lone:
            argv += env.get(lone.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv, env


FERRY_ENV = ROOT / "systemd" / "ferry.env"
WORKER_ENV = ROOT / "systemd" / "worker.env.example"


@pytest.mark.parametrize("name", UNITS)
def test_unit_settings(name):
    unit = read_unit(name)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert "network-online.target" in one(unit, "Unit", "After").split()
    assert "network-online.target" in one(unit, "Unit", "Wants").split()
    service = dict(unit["Service"])  # single-valued keys
    expected = {"Type": "exec", "User": "ferry", "Group": "ferry", "Restart": "on-failure",
                "KillSignal": "SIGTERM", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                "PrivateTmp": "yes", "StateDirectory": "ferry"}
    assert {k: service.get(k) for k in expected} == expected
    assert int(service["TimeoutStopSec"]) > 0
    assert values(unit, "Service", "EnvironmentFile")[0] == "-/etc/ferry/ferry.env"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    argv, env = unit_exec(name, "0")
    assert argv[0] == FERRY_BIN
    # Every path the service writes is writable under ProtectSystem=strict.
    writable = [Path("/var/lib") / service["StateDirectory"]]
    writable += [Path("/var/cache") / d for d in values(unit, "Service", "CacheDirectory")]
    for var in ("HOME", "FERRY_MODEL_CACHE", "TRITON_CACHE_DIR"):
        if var in env:
            assert any(Path(env[var]).is_relative_to(w) for w in writable), (name, var)
    is_worker = name.startswith("ferry-worker@")
    # Workers need the GPUs' device nodes; the other services get a private /dev.
    assert service.get("PrivateDevices") == (None if is_worker else "yes")


@pytest.mark.parametrize("uncomment", [False, True], ids=["as-is", "examples-uncommented"])
def test_unit_commands_parse(uncomment):
    """Each ExecStart through the real parser with the example environment files (and
    with their commented-out examples switched on)."""
    files = {"/etc/ferry/ferry.env": FERRY_ENV}
    cluster = read_env_file(FERRY_ENV)
    sched_addr, admin_addr = cluster["FERRY_SCHEDULER_ADDR"], cluster["FERRY_SCHEDULER_ADMIN_ADDR"]
    host = cluster["FERRY_HOST"]

    argv, env = unit_exec("ferry-scheduler.service", env_files=files, uncomment=uncomment)
    args, sched = parse_service(argv[1:], env)
    assert argv[1] == "scheduler"
    # The scheduler binds the ports everyone else dials (they all read FERRY_SCHEDULER_*).
    assert (args.port, args.admin_port) == (port_of(sched_addr), port_of(admin_addr))
    assert sched.inbox.bind == f"tcp://0.0.0.0:{port_of(sched_addr)}"
    assert (args.metrics_host, args.metrics_port) == ("0.0.0.0", 5603)  # Prometheus scrapes it

    argv, env = unit_exec("ferry-gateway.service", env_files=files, uncomment=uncomment)
    args, gw = parse_service(argv[1:], env)
    assert argv[1] == "gateway"
    assert (gw.http_port, args.sdk_port) == (8000, 8001)
    assert gw.inbox.advertise == f"tcp://{host}:{args.inbox_port}"
    assert gw.scheduler_addr == sched_addr

    # A worker with only the unit's defaults: GPU 3 of host node1.
    argv, env = unit_exec("ferry-worker@.service", "3", env_files=files, uncomment=uncomment)
    args, worker = parse_service(argv[1:], env)
    assert argv[1] == "worker"
    assert (worker.instance_id, worker.device) == ("node1-3", "cuda:3")
    assert worker.inbox.bind == "tcp://0.0.0.0:5703"
    assert worker.inbox.advertise == f"tcp://{host}:5703"
    assert worker.scheduler_addr == sched_addr

    # The same unit for instance 0 with systemd/worker.env.example as worker-0.env.
    files["/etc/ferry/worker-0.env"] = WORKER_ENV
    argv, env = unit_exec("ferry-worker@.service", "0", env_files=files, uncomment=uncomment)
    args, worker = parse_service(argv[1:], env)
    example = read_env_file(WORKER_ENV, uncomment=uncomment)
    assert worker.instance_id == example["FERRY_INSTANCE_ID"]
    assert worker.device == example["WORKER_DEVICE"]
    assert args.port == int(example["WORKER_PORT"])
    assert set(example["WORKER_ARGS"].split()) <= set(argv)


def test_unit_and_env_file_variables_are_known():
    """FERRY_* names must be ones common/env.py reads; any other name must be consumed by
    an ExecStart (WORKER_PORT, …_ARGS) or be a known third-party one (HOME, triton's)."""
    referenced = set()
    for name in UNITS:
        referenced |= set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)",
                                     one(read_unit(name), "Service", "ExecStart")))
    names = set()
    for name in UNITS:
        names |= set(unit_exec(name, "0")[1])
    for path in (FERRY_ENV, WORKER_ENV):
        names |= set(read_env_file(path, uncomment=True))
    ferry = {n for n in names if n.startswith("FERRY_")}
    assert not ferry - ferry_env_names(), ferry - ferry_env_names()
    others = names - ferry - referenced - THIRD_PARTY_ENV
    assert not others, f"set but never used: {others}"
    assert {"WORKER_PORT", "WORKER_DEVICE", "WORKER_ARGS", "SCHEDULER_ARGS",
            "GATEWAY_ARGS"} <= referenced


def systemd_analyze_root(tmp_path: Path) -> Path:
    """A file-system root for `systemd-analyze verify --root`: the system's own units
    (sysinit.target, network-online.target, … which ours pull in), our units in
    /etc/systemd/system, and a stand-in for the ExecStart binary: verify checks that it
    exists and is executable, and no Ferry is installed at /opt/ferry here."""
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                         if (p / "sysinit.target").exists()), None)
    if system_units is None:
        pytest.skip("no systemd unit directory with sysinit.target on this machine")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS:
        shutil.copy(ROOT / "systemd" / name, root / "etc/systemd/system" / name)
    fake = root / FERRY_BIN.lstrip("/")
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess:
    # The template is verified through an instance (verify loads ferry-worker@.service).
    names = [n.replace("@.", "@0.") for n in UNITS]
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", *names],
                          capture_output=True, text=True, timeout=120)


def _needs_systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")


def test_units_verify(tmp_path):
    _needs_systemd_analyze()
    result = _verify(systemd_analyze_root(tmp_path))
    # verify exits 0 on unknown keys or unparsable values (it ignores them with a
    # warning), so any output about our units is a failure too.
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and "ferry" not in output, output


def test_units_verify_catches_a_broken_unit(tmp_path):
    # Shows test_units_verify can fail: a misspelt key and a bad value are reported.
    _needs_systemd_analyze()
    root = systemd_analyze_root(tmp_path)
    unit = root / "etc/systemd/system/ferry-worker@.service"
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes")
                    .replace("KillSignal=", "KilSignal="))
    output = _verify(root).stderr
    assert "sometimes" in output and "KilSignal" in output


def test_supervisors_wait_longer_than_a_worker_drains():
    """SIGTERM drains a worker for up to drain_timeout_s: compose and systemd must not
    SIGKILL it sooner, or its streams are cut instead of migrated."""
    import dataclasses

    from ferry.common.config import WorkerConfig

    drain_s = next(f.default for f in dataclasses.fields(WorkerConfig)
                   if f.name == "drain_timeout_s")
    for name in COMPOSE_FILES:
        workers = [(svc, spec) for svc, spec in load_compose(name)["services"].items()
                   if spec.get("command", [None])[0] == "worker"]
        assert len(workers) >= 2, name
        for svc, spec in workers:
            grace = spec["stop_grace_period"]
            assert grace.endswith("s") and float(grace[:-1]) > drain_s, (name, svc)
    unit = dict(read_unit("ferry-worker@.service")["Service"])
    assert unit["KillSignal"] == "SIGTERM" and float(unit["TimeoutStopSec"]) > drain_s
