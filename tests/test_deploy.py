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

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}


def manifests() -> list[tuple[str, dict]]:
    """Every document `kubectl apply -k deploy/kubernetes` would apply."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        text = (KUBERNETES / name).read_text()
        docs += [(name, doc) for doc in yaml.safe_load_all(text) if doc]
    return docs


@pytest.mark.parametrize(
    ("name", "doc"),
    [(n, d) for n, d in manifests() if d["kind"] not in KEDA_KINDS],
    ids=lambda v: v if isinstance(v, str) else v["kind"],
)
def test_kubernetes_manifests_match_the_kubernetes_schemas(name: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_existing_files_and_every_default_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert all((KUBERNETES / name).is_file() for name in listed)
    present = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == present
    assert [image["name"] for image in kustomization["images"]] == ["optuna-rq"]


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


def test_the_broker_is_a_single_replica_ready_on_its_metrics() -> None:
    broker = next(
        d for _, d in manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "broker"
    )
    assert broker["spec"]["replicas"] == 1 and broker["spec"]["strategy"]["type"] == "Recreate"
    [container] = broker["spec"]["template"]["spec"]["containers"]
    assert container["args"][:1] == ["broker"] and "--metrics-port" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/metrics"
    secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]}
    assert secrets == {"redis-url", "message-secret"}


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_specification() -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    jsonschema.validate(_compose(), schema)


def test_compose_runs_the_three_roles_as_documented() -> None:
    services = _compose()["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--requirepass" in redis_command
    assert services["broker"]["command"][0] == "broker"
    assert "broker-state:/var/lib/optuna-rq" in services["broker"]["volumes"]
    workers = services["workers"]
    assert workers["command"][0] == "workers"
    assert "container_name" not in workers  # so that `--scale workers=N` works
    assert all("healthcheck" in services[s] for s in ("redis", "broker"))
    assert "/var/lib/optuna-rq/studies.journal" in services["dashboard"]["command"]
    assert (DEPLOY / ".env.example").is_file()
    assert "REDIS_PASSWORD" in (DEPLOY / ".env.example").read_text()


def test_dockerfile_is_multi_stage_non_root_with_the_cli_as_entry_point() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2
    assert re.search(r'^ENTRYPOINT \["optuna-rq"\]$', text, re.MULTILINE)
    assert re.search(r"^USER optuna$", text, re.MULTILINE)
    assert "uv sync --frozen" in text
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
