"""deploy/ read as a restricted cluster and an SRE would: a policy over every pod of every
manifest, and over the image they run.

Every kustomization under deploy/ (the base, deploy/kubernetes, and each overlay beside it, such
as deploy/kubernetes-ha) is rendered as `kubectl apply -k` would apply it (`kubectl kustomize`,
on a copy with placeholder secrets), and each rule is checked on every pod template and every
container of it: a workload added later is covered without being listed here. The rules are the
restricted Pod Security Standard's (what the namespace enforces), probes, requests and limits,
secrets as files, KEDA owning the replicas it scales, one Prometheus, and two brokers only where
they share their state. Checkov's Kubernetes checks cover much of the first part, but it pins
older pytest, packaging, fsspec and s3fs than this project's, so it stays out of the lock; these
rules are our own, each listing every violation it finds.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.locations import ENV_REDIS_PASSWORD, ENV_REDIS_PASSWORD_FILE
from optuna_rq.protocol import (
    ENV_KEY,
    ENV_KEY_FILE,
    ENV_SECRET,
    ENV_SECRET_FILE,
    Keys,
    Signer,
    live_pools,
)
from tests.conftest import redis_server
from tests.processes.test_metrics import free_port
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli_env

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
README = DEPLOY.parent / "README.md"
RENDERINGS = sorted(p.parent.name for p in DEPLOY.glob("kubernetes*/kustomization.yaml"))
"""deploy/kubernetes and every overlay beside it."""

SECRET_FILE_VARIABLES = {ENV_REDIS_PASSWORD_FILE, ENV_SECRET_FILE, ENV_KEY_FILE}
"""The environment variables naming a secret's file, as the code reads them."""
SECRET_VALUE_VARIABLES = {ENV_REDIS_PASSWORD, ENV_SECRET, ENV_KEY}
"""Their counterparts holding the secret itself: never set in a manifest."""
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
"""The volume types the restricted Pod Security Standard allows."""
PROMETHEUS_CHART = "kube-prometheus-stack"
PROMETHEUS_NAMESPACE = "monitoring"


# -- rendering ---------------------------------------------------------------------------------


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        reason = (
            "kubectl (with its kustomize) is needed to render deploy/'s kustomizations: "
            "install kubectl from your Kubernetes packages"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return kubectl


@functools.cache
def _rendered_text(name: str, scratch: Path) -> str:
    """`kubectl kustomize deploy/NAME` on a copy of deploy/ given the files never committed:
    secret.env from its example (each value a placeholder) and the signing keys' files."""
    copy = scratch / name / "deploy"
    shutil.copytree(DEPLOY, copy)
    base = copy / "kubernetes"
    example = (base / "secret.env.example").read_text()
    (base / "secret.env").write_text(re.sub(r"=$", "=placeholder", example, flags=re.MULTILINE))
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    for generator in kustomization.get("secretGenerator", []):
        for file in generator.get("files", []):
            (base / file).parent.mkdir(parents=True, exist_ok=True)
            (base / file).write_text("placeholder\n")
    done = subprocess.run(
        [_kubectl(), "kustomize", str(copy / name)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy")


def rendered(name: str, scratch: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_rendered_text(name, scratch)) if d]


def pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind/name, the workload, its pod spec) of every object that makes pods."""
    for doc in docs:
        kind = doc["kind"]
        if kind == "Pod":
            yield f"Pod/{doc['metadata']['name']}", doc, doc["spec"]
        elif kind == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
            yield f"CronJob/{doc['metadata']['name']}", doc, template["spec"]
        elif "template" in doc.get("spec", {}):
            yield f"{kind}/{doc['metadata']['name']}", doc, doc["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(field, [])


def _where(rendering: str, workload: str, container: dict[str, Any] | None = None) -> str:
    return f"{rendering}: {workload}" + (f" container {container['name']}" if container else "")


@pytest.fixture(params=RENDERINGS)
def rendering(request: pytest.FixtureRequest) -> str:
    """The name of a kustomization under deploy/."""
    return str(request.param)


@pytest.fixture
def docs(rendering: str, scratch: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/<rendering>` applies."""
    return rendered(rendering, scratch)


# -- the pods ----------------------------------------------------------------------------------


def test_every_pod_meets_the_restricted_pod_security_standard(
    docs: list[dict[str, Any]], rendering: str
) -> None:
    problems: list[str] = []
    workloads = list(pods(docs))
    assert workloads, f"{rendering}: no pods"
    for workload, _, pod in workloads:
        where = _where(rendering, workload)
        security = pod.get("securityContext", {})
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(host):
                problems.append(f"{where}: {host}")
        for volume in pod.get("volumes", []):
            kinds = set(volume) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                problems.append(f"{where}: volume {volume['name']} is {sorted(kinds)}")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        for container in containers(pod):
            where = _where(rendering, workload, container)
            own = container.get("securityContext", {})
            merged = {**security, **own}
            if merged.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if merged.get("runAsUser", 1) == 0:
                problems.append(f"{where}: runAsUser 0")
            profile = merged.get("seccompProfile", {}).get("type")
            if profile not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: seccompProfile {profile!r}")
            if own.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if own.get("privileged"):
                problems.append(f"{where}: privileged")
            capabilities = own.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
                problems.append(f"{where}: capabilities add {capabilities['add']}")
            if own.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
    assert not problems, "\n".join(problems)


def test_every_container_has_requests_and_limits(
    docs: list[dict[str, Any]], rendering: str
) -> None:
    problems = []
    for workload, _, pod in pods(docs):
        for container in containers(pod):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(kind, {}):
                        where = _where(rendering, workload, container)
                        problems.append(f"{where}: no {resource} in {kind}")
    assert not problems, "\n".join(problems)


def _served(docs: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    """Whether a Service selects pods with `labels`."""
    return any(
        d["kind"] == "Service"
        and d["spec"].get("selector")
        and d["spec"]["selector"].items() <= labels.items()
        for d in docs
    )


def test_every_long_running_container_is_probed_without_starting_python(
    docs: list[dict[str, Any]], rendering: str
) -> None:
    problems = []
    for workload, doc, pod in pods(docs):
        if doc["kind"] in ("Job", "CronJob", "Pod"):
            continue  # they run to completion
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        for container in pod["containers"]:
            where = _where(rendering, workload, container)
            wanted = ["livenessProbe"] + (["readinessProbe"] if _served(docs, labels) else [])
            for probe in wanted:
                if probe not in container:
                    problems.append(f"{where}: no {probe}")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                command = " ".join(container.get(probe, {}).get("exec", {}).get("command", []))
                # An interpreter started every period, in every pod, for a check an HTTP GET
                # to the process itself answers.
                if re.search(r"(^|[\s;&|(])(\S*/)?(python[\d.]*|optuna-rq)(\s|$)", command):
                    problems.append(f"{where}: {probe} starts Python: {command}")
    assert not problems, "\n".join(problems)


def test_secrets_reach_containers_as_files_never_as_environment_variables(
    docs: list[dict[str, Any]], rendering: str
) -> None:
    problems = []
    file_variables_used = set()
    for workload, _, pod in pods(docs):
        secret_volumes = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
        for container in containers(pod):
            where = _where(rendering, workload, container)
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    problems.append(f"{where}: envFrom a Secret")
            mounted = [
                Path(m["mountPath"])
                for m in container.get("volumeMounts", [])
                if m["name"] in secret_volumes
            ]
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    problems.append(f"{where}: {env['name']} from a Secret's value")
                if env["name"] in SECRET_VALUE_VARIABLES:
                    problems.append(f"{where}: {env['name']} holds a secret: use its _FILE")
                if env["name"].endswith("_FILE") and env["name"].startswith("OPTUNA_RQ_"):
                    assert env["name"] in SECRET_FILE_VARIABLES, f"{where}: the code reads no {env}"
                    file_variables_used.add(env["name"])
                    path = Path(env["value"])
                    if not any(path.is_relative_to(m) for m in mounted):
                        problems.append(f"{where}: {env['name']} {path} is in no Secret mounted")
    assert not problems, "\n".join(problems)
    # The Redis password and the role's key are files in every rendering.
    assert {ENV_REDIS_PASSWORD_FILE, ENV_KEY_FILE} <= file_variables_used


def test_pods_run_as_the_image_user(docs: list[dict[str, Any]]) -> None:
    """The optuna-rq image's pods run as its USER, whose files (the state directory) they own."""
    [user] = re.findall(r"^USER (\d+):\d+$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    for workload, _, pod in pods(docs):
        if all(c["image"].split(":")[0].endswith("optuna-rq") for c in pod["containers"]):
            assert pod["securityContext"]["runAsUser"] == int(user), workload


# -- KEDA, Prometheus, the namespace -----------------------------------------------------------


def test_keda_alone_sets_the_replicas_of_what_it_scales(docs: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled
    for scaled_object in scaled:
        target = deployments[scaled_object["spec"]["scaleTargetRef"]["name"]]
        # A `replicas` here resets KEDA's count on every `kubectl apply`.
        assert "replicas" not in target["spec"], target["metadata"]["name"]


def test_keda_and_the_monitors_name_one_prometheus(docs: list[dict[str, Any]]) -> None:
    monitors = [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")]
    releases = {m["metadata"]["labels"]["release"] for m in monitors}
    # kube-prometheus-stack's Prometheus selects the monitors labelled with its release name.
    [release] = releases
    assert "ServiceMonitor" in {m["kind"] for m in monitors}  # applied, not only documented
    # Its service: the release's name (when it holds the chart's, else release-chart, cut to
    # 26 characters), then -prometheus.
    base = release if PROMETHEUS_CHART in release else f"{release}-{PROMETHEUS_CHART}"[:26]
    server = f"http://{base.rstrip('-')}-prometheus.{PROMETHEUS_NAMESPACE}.svc:9090"
    addresses = {
        t["metadata"]["serverAddress"]
        for d in docs
        if d["kind"] == "ScaledObject"
        for t in d["spec"]["triggers"]
        if t["type"] == "prometheus"
    }
    assert addresses == {server}
    for workload, doc, _ in pods(docs):  # nor the other Prometheus's convention
        annotations = doc["spec"].get("template", {}).get("metadata", {}).get("annotations", {})
        assert not any(a.startswith("prometheus.io/") for a in annotations), workload
    broker_service = next(d for d in docs if d["kind"] == "Service" and "broker" in str(d))
    [service_monitor] = [m for m in monitors if m["kind"] == "ServiceMonitor"]
    selector = service_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= broker_service["metadata"]["labels"].items()


def test_the_namespace_enforces_the_restricted_standard_on_everything(
    docs: list[dict[str, Any]],
) -> None:
    [namespace] = [d for d in docs if d["kind"] == "Namespace"]
    labels = namespace["metadata"].get("labels", {})
    assert labels.get("pod-security.kubernetes.io/enforce") == "restricted", labels
    name = namespace["metadata"]["name"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == name, doc["metadata"]["name"]


# -- the brokers -------------------------------------------------------------------------------


def _broker(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    [broker] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "broker"]
    [container] = broker["spec"]["template"]["spec"]["containers"]
    return broker, container


def _state_access(docs: list[dict[str, Any]], broker: dict[str, Any]) -> set[str]:
    """The access modes of the broker's state volume."""
    pod = broker["spec"]["template"]["spec"]
    [mount] = [
        m
        for c in pod["containers"]
        for m in c["volumeMounts"]
        if m["mountPath"] == "/var/lib/optuna-rq"
    ]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    [pvc] = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == claim
    return set(pvc["spec"]["accessModes"])


def test_two_brokers_run_only_on_state_both_mount_and_roll_out_without_deadlock(
    docs: list[dict[str, Any]],
) -> None:
    broker, container = _broker(docs)
    replicas = broker["spec"].get("replicas", 1)
    strategy = broker["spec"]["strategy"]
    access = _state_access(docs, broker)
    if replicas == 1:
        # One pod mounts a ReadWriteOnce volume at a time: the old one goes first.
        assert strategy["type"] == "Recreate"
        assert "--standby" not in container["args"]
        return
    assert replicas == 2 and "--standby" in container["args"]
    # The journal and the command ledger in the state directory follow the lock: shared.
    assert access == {"ReadWriteMany"}, access
    # A standby is alive and not ready (/readyz: "standing by"): a rollout that waits for the
    # new pod to be ready before it lets the old active broker go would wait for good.
    assert container["readinessProbe"]["httpGet"]["path"] != "/readyz"
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxSurge"] == 0
    assert any(d["kind"] == "PodDisruptionBudget" for d in docs)


def test_the_two_broker_overlay_exists(scratch: Path) -> None:
    replicas = {
        name: _broker(rendered(name, scratch))[0]["spec"]["replicas"] for name in RENDERINGS
    }
    assert replicas == {"kubernetes": 1, "kubernetes-ha": 2}, replicas


# -- the image ---------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")


def test_the_image_is_pinned_and_runs_under_an_init() -> None:
    text = _dockerfile()
    bases = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(bases) == 2
    for base in bases:
        # An exact Python and Debian release: python:3.11 or :latest moves under the build.
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base), base
    assert re.search(r"\buv==\d+\.\d+\.\d+\s", text), "uv is not pinned to one version"
    assert re.search(r"apt-get install [^&]*\btini=\S+", text), "tini is not installed, pinned"
    [entrypoint] = re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)
    # tini is PID 1: it reaps orphans and passes signals on to optuna-rq, not to its group.
    assert json.loads(entrypoint) == ["tini", "--", "optuna-rq"]


def test_the_image_has_a_healthcheck_on_the_ports_the_roles_serve(scratch: Path) -> None:
    text = _dockerfile()
    [healthcheck] = re.findall(r"^HEALTHCHECK (.*)$", text, re.MULTILINE)
    options, _, command = healthcheck.partition(" CMD ")
    assert "--timeout=" in options and "--interval=" in options
    argv = json.loads(command)
    assert argv[0] == "bash" and "/healthz" in argv[-1]  # no interpreter started per check
    [port] = re.findall(r"/dev/tcp/127\.0\.0\.1/(\d+)", argv[-1])
    # The port each long-running role serves /healthz on, in compose and in every rendering.
    for name in RENDERINGS:
        for _, _, pod in pods(rendered(name, scratch)):
            for container in pod["containers"]:
                args = container.get("args", [])
                if args[:1] == ["broker"]:
                    assert args[args.index("--metrics-port") + 1] == port
                elif args[:1] == ["workers"]:
                    assert args[args.index("--health-port") + 1] == port
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    broker, workers = compose["services"]["broker"], compose["services"]["workers"]
    assert broker["command"][broker["command"].index("--metrics-port") + 1] == port
    assert workers["command"][workers["command"].index("--health-port") + 1] == port


# -- the README --------------------------------------------------------------------------------


def test_the_readme_forwards_redis_to_a_port_a_local_redis_does_not_hold() -> None:
    text = README.read_text()
    forwards = re.findall(r"port-forward svc/redis (\d+):6379", text)
    assert forwards and all(port != "6379" for port in forwards), forwards
    for port in set(forwards):  # and the URL that goes with it
        assert f"redis://client@127.0.0.1:{port}/0" in text, port


# -- what the policy's probes and files do, for real -------------------------------------------


def test_every_rendering_matches_the_kubernetes_schemas(docs: list[dict[str, Any]]) -> None:
    """The overlays' patched objects too, as applied (test_deploy validates the base's files)."""
    custom = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor"}
    for doc in docs:
        if doc["kind"] not in custom:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _redis_cli() -> str:
    cli = shutil.which("redis-cli")
    if cli is None:
        reason = "redis-cli runs Redis's probes here: apt-get install -y redis-tools"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return cli


def test_the_redis_probes_and_password_files_work_against_a_real_server(
    tmp_path: Path, scratch: Path
) -> None:
    """Redis's liveness and readiness commands, as the StatefulSet runs them, against a
    redis-server whose ACL file deploy/redis/redis-acl.sh wrote from the Secret's files."""
    _redis_cli()
    server = redis_server()
    if server is None:
        pytest.skip("no redis-server or valkey-server to run the probes against")
    [statefulset] = [d for d in rendered("kubernetes", scratch) if d["kind"] == "StatefulSet"]
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    acl_dir = "/etc/optuna-rq/redis-acl"
    passwords_dir = container["command"][-1].split()[4]
    passwords = tmp_path / "passwords"
    passwords.mkdir()
    for role in ("broker", "worker", "client"):  # the optimizer's left out: that user is off
        (passwords / f"redis-password-{role}").write_text(f'{role} pw, with " and $\n')
    script = container["command"][-1].split(" && ")[0].replace(acl_dir, str(DEPLOY / "redis"))
    script = script.replace("/tmp/users.acl", str(tmp_path / "users.acl"))
    made = subprocess.run(
        ["sh", "-c", script.replace(passwords_dir, str(passwords))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert made.returncode == 0, made.stderr
    assert "redis-password-optimizer is missing or empty: user optimizer is off" in made.stderr
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--aclfile", str(tmp_path / "users.acl"), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )

    def probe(name: str) -> int:
        command = container[name]["exec"]["command"]
        assert command[:2] == ["sh", "-c"]
        line = command[2].replace(passwords_dir, str(passwords))
        line = line.replace("redis-cli ", f"redis-cli -p {port} ")
        return subprocess.run(["sh", "-c", line], capture_output=True, timeout=30).returncode

    try:
        wait_until(lambda: probe("livenessProbe") == 0, timeout_s=30)
        assert probe("readinessProbe") == 0  # the client logs in with its file's password
        client = passwords / "redis-password-client"
        client.write_text("not the password")
        assert probe("readinessProbe") != 0 and probe("livenessProbe") == 0
    finally:
        process.kill()
        process.wait(timeout=30)
    assert probe("livenessProbe") != 0  # nothing answers


READ_ONLY_ROOT = """
set -e
mount --make-rprivate /
mount --rbind /tmp /mnt              # the host's /tmp, kept in sight for what lives there
mount -o remount,bind,ro /
mount -t tmpfs tmpfs /tmp            # the emptyDir
for kept in "$PROJECT" "$VENV"; do  # a clone or a virtualenv under /tmp: back, read-only
    case "$kept" in /tmp/*)
        [ -d "$kept" ] && continue   # inside one restored already
        mkdir -p "$kept"
        mount --bind "/mnt${kept#/tmp}" "$kept"
        mount -o remount,bind,ro "$kept";;
    esac
done
mkdir -p "$STATE"
mount -t tmpfs tmpfs "$STATE"       # the broker's volume
if [ -w "$PROJECT" ] || [ -w "$(dirname "$PYTHON")" ]; then echo "the root is writable"; exit 1; fi
"$REDIS" --port 0 --unixsocket /tmp/redis.sock --save "" --dir /tmp >/dev/null &
tries=0
until [ -S /tmp/redis.sock ]; do  # a deadline, not a sleep: up to 60 s on a loaded machine
    tries=$((tries + 1)); [ "$tries" -lt 1200 ] || { echo "redis did not start"; exit 1; }
    sleep 0.05
done
url=unix:///tmp/redis.sock
"$PYTHON" -m optuna_rq.cli.app --redis-url "$url" broker --metrics-port "$BROKER_PORT" \
    >/tmp/broker.log 2>&1 &
broker=$!
"$PYTHON" -m optuna_rq.cli.app --redis-url "$url" workers --import optuna_rq.examples.rosenbrock \
    --count 2 --health-port "$POOL_PORT" >/tmp/workers.log 2>&1 &
workers=$!
"$PYTHON" -m optuna_rq.cli.app --redis-url "$url" submit optuna_rq.examples.rosenbrock:objective \
    --param 'x={type: float, low: -2, high: 2}' --param 'y={type: float, low: -1, high: 3}' \
    --param 'model={lr: 0.01, depth: 4, booster: gbtree}' --param noise=0 \
    --n-trials 8 --concurrency 4 --wait >/tmp/submit.log 2>&1 || { cat /tmp/*.log; exit 1; }
tail -n 1 /tmp/submit.log
for port in "$BROKER_PORT" "$POOL_PORT"; do
    "$PYTHON" -c "import sys, urllib.request as u; print(u.urlopen(sys.argv[1]).status)" \\
        "http://127.0.0.1:$port/healthz"
done
kill -TERM "$broker" "$workers"
code=0; wait "$broker" || code=$?; echo "broker exited $code"
code=0; wait "$workers" || code=$?; echo "workers exited $code"
ls "$STATE"
"""


def test_the_roles_run_on_a_read_only_root_with_tmp_and_their_state_writable(
    tmp_path: Path,
) -> None:
    """readOnlyRootFilesystem, for real: in a mount namespace of its own, / read-only (the
    project and its virtualenv too), /tmp and the state directory fresh writable file systems,
    a broker and a pool serve a study to its end, answer their probes and stop cleanly."""
    server, unshare = redis_server(), shutil.which("unshare")
    if server is None or unshare is None:
        pytest.skip("needs a redis-server and unshare (util-linux)")
    # Its own PID namespace too: whatever the script leaves running dies with it.
    argv = [unshare, "--mount", "--pid", "--fork", "--kill-child"]
    trial = subprocess.run([*argv, "true"], capture_output=True, timeout=30)
    if trial.returncode != 0:  # not root, or no CAP_SYS_ADMIN here
        pytest.skip(f"cannot make a mount namespace here: {trial.stderr.decode().strip()}")
    state = tmp_path / "state"
    state.mkdir()
    env = cli_env(
        PYTHONDONTWRITEBYTECODE="1",  # as the image sets it: its bytecode is compiled at build
        HOME="/tmp",
        OPTUNA_RQ_STATE_DIR=str(state),
        STATE=str(state),
        PROJECT=str(DEPLOY.parent),
        PYTHON=sys.executable,
        VENV=sys.prefix,
        REDIS=server,
        BROKER_PORT=str(free_port()),
        POOL_PORT=str(free_port()),
    )
    env.pop("OPTUNA_RQ_REDIS_URL", None)
    done = subprocess.run(
        [*argv, "sh", "-c", READ_ONLY_ROOT],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.split("\n")
    assert re.match(r"study '.*' finished: 8 trials, best ", lines[0]), done.stdout
    assert lines[1:5] == ["200", "200", "broker exited 0", "workers exited 0"], done.stdout
    assert "studies.journal" in lines[5:], done.stdout  # on the volume, the one place written


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is needed here: apt-get install -y {package}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def test_tini_as_pid_1_hands_the_pool_one_sigterm_and_it_stops_warm(
    redis_url: str, prefix: str
) -> None:
    """The image's ENTRYPOINT as a container runs it: in a PID namespace of its own, tini is
    PID 1 and the pool PID 2; `docker stop`'s SIGTERM to PID 1 reaches the pool once, which
    stops warm and exits 0, and so does tini."""
    [entrypoint] = re.findall(r"^ENTRYPOINT (\[.*\])$", _dockerfile(), re.MULTILINE)
    init, *init_args, command = json.loads(entrypoint)
    assert command == "optuna-rq"
    argv = [_tool("unshare", "util-linux"), "--pid", "--fork", "--kill-child"]
    if subprocess.run([*argv, "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("cannot make a PID namespace here (root or CAP_SYS_ADMIN needed)")
    argv += [_tool(init, init), *init_args, sys.executable, "-m", "optuna_rq.cli.app"]
    argv += ["--redis-url", redis_url, "--prefix", prefix, "workers", "--count", "2"]
    container = subprocess.Popen(
        [*argv, "--import", "tests.support.objectives"],
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    connection = connect(redis_url)
    try:
        wait_until(lambda: live_pools(connection, Keys(prefix), Signer()), timeout_s=60)
        [heartbeat] = live_pools(connection, Keys(prefix), Signer())
        assert heartbeat.pid == 2 and heartbeat.workers == 2  # under tini, PID 1
        [pid_1] = Path(f"/proc/{container.pid}/task/{container.pid}/children").read_text().split()
        assert Path(f"/proc/{pid_1}/comm").read_text().strip() == init
        os.kill(int(pid_1), signal.SIGTERM)  # what `docker stop` and the kubelet send
        _, err = container.communicate(timeout=60)
    finally:
        connection.close()
        if container.poll() is None:
            container.kill()
            container.wait()
    assert container.returncode == 0, err
    assert err.count("SIGTERM: warm shutdown") == 1 and "cold shutdown," not in err, err
    assert "all workers stopped" in err, err


def test_compose_runs_its_services_as_the_manifests_do() -> None:
    """compose.yaml's Redis and optuna-rq services (the dashboard is optuna-dashboard's image):
    a read-only root with /tmp writable, no capabilities, no privilege escalation, no root."""
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    ours = {n: s for n, s in services.items() if s["image"].split(":")[0] in ("optuna-rq", "redis")}
    assert set(ours) == {"redis", "broker", "workers", "submit"}
    for name, service in ours.items():
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service.get("user", "10001") != "0" and not service.get("privileged"), name
