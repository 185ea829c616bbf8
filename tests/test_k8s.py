"""deploy/k8s: every manifest is valid against the Kubernetes JSON schemas (strict: no unknown fields) and
agrees with the settings and the topics the worker uses. No cluster runs here, so this is the check."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from streams.settings import SETTINGS, Settings
from streams.topics import topic_plan

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # a version managed clusters run today; the manifests use only stable APIs
# Settings other branches add (the API's port); listed so a typo in any other name still fails.
PENDING_SETTINGS = {"LEADSTREAM_API_PORT"}


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomized(directory: Path) -> list[dict]:
    """The documents a kustomization lists (kustomize's own fields checked in the test below)."""
    kustomization = load(directory / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in load(directory / name)]


def by_kind(kind: str, name: str) -> dict:
    return next(d for d in kustomized(K8S) if d["kind"] == kind and d["metadata"]["name"] == name)


def test_every_file_is_listed_in_its_kustomization():
    for directory in (K8S, K8S / "strimzi"):
        listed = set(load(directory / "kustomization.yaml")[0]["resources"])
        assert listed == {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("doc", kustomized(K8S), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_kubernetes(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises with the path of the error


def test_a_broken_manifest_is_caught():
    # The check above is real: a typo'd field and a wrong type both fail.
    doc = by_kind("Deployment", "leadstream-worker")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 6066
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    doc = by_kind("Deployment", "leadstream-worker")
    doc["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_config_names_only_real_settings_and_no_secrets():
    data = by_kind("ConfigMap", "leadstream-config")["data"]
    known = {s.env for s in SETTINGS.values()} | PENDING_SETTINGS
    assert set(data) <= known, set(data) - known
    assert not {s.env for s in SETTINGS.values() if s.secret} & set(data), "a secret in the ConfigMap"
    assert all(isinstance(v, str) for v in data.values())
    settings = pod_settings()
    assert settings.kafka_security_protocol == "SASL_SSL" and settings.web_bind == "0.0.0.0"


def pod_settings(extra: dict[str, str] | None = None) -> Settings:
    """What the pods get, parsed (files are checked where they are mounted: here, leave them out)."""
    data = by_kind("ConfigMap", "leadstream-config")["data"]
    env = {k: v for k, v in data.items() if not k.endswith("_CAFILE") and k not in PENDING_SETTINGS}
    return Settings.from_env(env | {"LEADSTREAM_KAFKA_SASL_PASSWORD": "x"} | (extra or {}))


def test_worker_probes_ports_shutdown_and_replicas():
    data = by_kind("ConfigMap", "leadstream-config")["data"]
    worker = by_kind("Deployment", "leadstream-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["ports"][0]["containerPort"] == int(data["LEADSTREAM_WEB_PORT"])
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] >= 30
    # More workers than partitions would idle.
    assert 1 <= worker["spec"]["replicas"] <= int(data["LEADSTREAM_PARTITIONS"])
    pdb = by_kind("PodDisruptionBudget", "leadstream-worker")
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    assert worker["spec"]["selector"]["matchLabels"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()


def role_of(name: str) -> str:
    (container,) = by_kind("Deployment", name)["spec"]["template"]["spec"]["containers"]
    return next(e["value"] for e in container["env"] if e["name"] == "LEADSTREAM_WORKER_ROLES")


def test_one_trainer_beside_scoring_only_workers():
    data = by_kind("ConfigMap", "leadstream-config")["data"]
    trainer = by_kind("Deployment", "leadstream-trainer")
    assert "LEADSTREAM_WORKER_ROLES" not in data  # each Deployment says what it runs
    roles = {name: pod_settings({"LEADSTREAM_WORKER_ROLES": role_of(name)})
             for name in ("leadstream-worker", "leadstream-trainer")}
    assert roles["leadstream-worker"].runs("scoring") and not roles["leadstream-worker"].runs("training")
    assert roles["leadstream-trainer"].runs("training") and not roles["leadstream-trainer"].runs("scoring")
    # leads.training has one partition: a second trainer would idle; none must overlap another at a rollout.
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"]["type"] == "Recreate"
    (container,) = trainer["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    worker = by_kind("Deployment", "leadstream-worker")
    assert trainer["spec"]["selector"]["matchLabels"] != worker["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("name", ["leadstream-worker", "leadstream-trainer", "leadstream-api"])
def test_secret_files_are_mounted_where_the_settings_point(name):
    secret = by_kind("Secret", "leadstream-secrets")["stringData"]
    config = by_kind("ConfigMap", "leadstream-config")["data"]
    pod = by_kind("Deployment", name)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounted = {}
    for mount in container["volumeMounts"]:
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        for item in volume.get("secret", {}).get("items", []):
            assert item["key"] in secret
            mounted[f"{mount['mountPath']}/{item['path']}"] = item["key"]
    files = [e["value"] for e in container.get("env", []) if e["name"].endswith("_FILE")]
    files += [config["LEADSTREAM_REDIS_SSL_CAFILE"]] + ([config["LEADSTREAM_KAFKA_SSL_CAFILE"]]
                                                         if name != "leadstream-api" else [])
    assert files and all(f in mounted for f in files), (files, mounted)
    assert {e["name"][: -len("_FILE")] for e in container.get("env", []) if e["name"].endswith("_FILE")} <= {
        s.env for s in SETTINGS.values() if s.secret}


def test_strimzi_topics_match_the_worker_topic_plan():
    config = by_kind("ConfigMap", "leadstream-config")["data"]
    settings = Settings.from_env({"LEADSTREAM_PARTITIONS": config["LEADSTREAM_PARTITIONS"]})
    topics = {d["spec"]["topicName"]: d for d in kustomized(K8S / "strimzi") if d["kind"] == "KafkaTopic"}
    assert {t: d["spec"]["partitions"] for t, d in topics.items()} == topic_plan(settings)
    for doc in topics.values():
        assert doc["apiVersion"] == "kafka.strimzi.io/v1beta2" and doc["metadata"]["labels"]["strimzi.io/cluster"]
        assert all(isinstance(v, str) for v in doc["spec"]["config"].values())
