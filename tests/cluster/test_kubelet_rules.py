"""The kubelet's decisions (tests/cluster/kubelet_rules.py, images.py) as pure functions."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import ROOT

from cluster import kubelet_rules as rules


def test_var_expansion_as_kubernetes_does() -> None:
    env = {"A": "x", "B": "y"}
    assert rules.expand("$(A)-$(B)", env) == "x-y"
    assert rules.expand("$$(A) $(MISSING) $", env) == "$(A) $(MISSING) $"


def test_image_config_comes_from_the_dockerfile() -> None:
    image = rules.image_from_dockerfile(ROOT / "operator" / "Dockerfile", Path("/venv"))
    assert image.entrypoint == ["kubetrain"] and image.cmd[0] == "operator"
    assert image.user == "10001:10001"
    assert image.env["PATH"].split(":")[0] == "/venv/bin" and "/opt/kubetrain/bin" not in image.env["PATH"]
    cmd = rules.container_command({"args": ["operator", "-n", "$(NS)"]}, image, {"NS": "ml"})
    assert cmd == ["kubetrain", "operator", "-n", "ml"]
    assert rules.resolve_image("ghcr.io/kubetrain/operator:0.1.0", {"ghcr.io/kubetrain/operator": image}) is image
    assert rules.resolve_image("ghcr.io/kubetrain/other:1", {"ghcr.io/kubetrain/operator": image}) is None



def test_the_trainer_images_env_and_user_come_from_its_dockerfile_whatever_its_run_lines_quote() -> None:
    """Its RUN lines include python -c "...; ..." (split at ; it is no useradd, and no error)."""
    image = rules.image_from_dockerfile(ROOT / "trainer" / "Dockerfile", Path("/venv"))
    assert image.env["KUBETRAIN_CORPORA"] == "/opt/kubetrain/corpora" and image.user == "10001:10001"
    assert image.users == ["kubetrain:x:10001:10001::/home/kubetrain:/usr/sbin/nologin"]


def test_run_as_non_root_refuses_root() -> None:
    image = rules.Image(venv="/v")
    pod = {"spec": {"securityContext": {"runAsNonRoot": True}}}
    with pytest.raises(rules.ConfigError, match="runAsNonRoot"):
        rules.container_user(pod, {}, image)
    assert rules.container_user({"spec": {"securityContext": {"runAsUser": 5, "fsGroup": 9}}}, {}, image) == (5, 5, [9])


def test_hosts_file_lists_ready_endpoints_of_headless_services_only() -> None:
    pod = {"metadata": {"namespace": "ml", "name": "j-worker-1"}, "spec": {"hostname": "j-worker-1", "subdomain": "j"}}
    services = {("ml", "j"): {"spec": {"clusterIP": "None"}}, ("ml", "web"): {"spec": {"clusterIP": "10.96.0.9"}}}
    slices = [{"metadata": {"namespace": "ml", "labels": {"kubernetes.io/service-name": "j"}},
               "endpoints": [{"addresses": ["10.1.0.2"], "hostname": "j-worker-0", "conditions": {"ready": True}},
                             {"addresses": ["10.1.0.5"], "hostname": "j-worker-2", "conditions": {"ready": False}}]},
              {"metadata": {"namespace": "ml", "labels": {"kubernetes.io/service-name": "web"}},
               "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": True}}]}]
    text = rules.hosts_file(pod, "10.1.0.3", "10.1.0.1", slices, services)
    lines = {line.split("\t")[0]: line.split("\t")[1].split() for line in text.splitlines() if "\t" in line}
    assert "j-worker-0.j.ml.svc.cluster.local" in lines["10.1.0.2"] and "j-worker-0.j" in lines["10.1.0.2"]
    assert "10.1.0.5" not in lines and "10.1.0.7" not in lines
    assert lines["10.1.0.3"][0] == "j-worker-1.j.ml.svc.cluster.local"
    assert "kubernetes.default.svc" in lines["10.1.0.1"]


def test_pod_phase_and_termination_messages() -> None:
    term = {"state": {"terminated": {"exitCode": 1}}}
    ok = {"state": {"terminated": {"exitCode": 0}}}
    assert rules.pod_phase("Never", False, True, [term]) == "Failed"
    assert rules.pod_phase("OnFailure", False, True, [term]) == "Running"
    assert rules.pod_phase("OnFailure", False, True, [ok]) == "Succeeded"
    assert rules.pod_phase("Never", False, False, []) == "Pending"
    assert rules.pod_phase("Never", True, False, []) == "Failed"
    logs = b"".join(b"line %d\n" % i for i in range(200))
    assert rules.termination_message(b"", logs, "FallbackToLogsOnError", 1).splitlines()[0] == "line 120"
    assert rules.termination_message(b"", logs, "FallbackToLogsOnError", 0) == ""
    assert rules.termination_message(b"mine", logs, "FallbackToLogsOnError", 1) == "mine"
