"""deploy/kubernetes: the manifests are valid Kubernetes objects (checked
offline against the API schemas bundled with `kubernetes-validate`), pass
`serve start` only flags it has, wire heads, nodes, probes and Services to
each other, and take the token and TLS material from Secret files only."""

import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
SERVE_BIN = os.path.join(ROOT, "target", "debug", "serve")
#: The Kubernetes API version the manifests are checked against.
K8S_VERSION = "1.30.0"


def load_docs(directory=DEPLOY):
    docs = []
    for name in sorted(os.listdir(directory)):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(directory, name)) as f:
                docs += [(name, d) for d in yaml.safe_load_all(f) if d]
    return docs


def of_kind(docs, kind):
    return [d for _, d in docs if d["kind"] == kind]


def entrypoint():
    """The image's ENTRYPOINT (exec form), from the Dockerfile."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        lines = [line for line in f if line.startswith("ENTRYPOINT")]
    assert len(lines) == 1
    return yaml.safe_load(lines[0].split(None, 1)[1])


#: The downward-API values a pod's shell command is run with here.
NAMESPACE = "ns1"
POD_IP = "10.1.2.3"


def run_start_script(container, pod_name, extra_env=None):
    """Runs a container's shell command by `sh` with the stand-ins of
    FAKE_BIN first on PATH; returns the finished process."""
    downward = {"POD_NAME": pod_name, "POD_NAMESPACE": NAMESPACE, "POD_IP": POD_IP}
    declared = {e["name"] for e in container.get("env", [])}
    env = {"PATH": f"{FAKE_BIN}:/usr/bin:/bin", **{k: v for k, v in downward.items() if k in declared},
           **(extra_env or {})}
    return subprocess.run(container["command"] + container.get("args", []), env=env, capture_output=True,
                          text=True, timeout=60)


def serve_start_argv(container, pod_name="serval-head-1"):
    """The arguments a container passes to `serve start`: its args after the
    image's entrypoint, or, for a shell command, what it executes: the
    command is run by `sh` with a `serve` on PATH that prints its
    arguments (so the shell's own quoting and expansion are what is checked)."""
    downward = {"POD_NAME": pod_name, "POD_NAMESPACE": NAMESPACE, "POD_IP": POD_IP}
    declared = {e["name"] for e in container.get("env", [])}
    if "command" not in container:
        # Kubernetes expands $(VAR) in args from the container's env.
        def expand(m):
            assert m.group(1) in declared and m.group(1) in downward, m.group(0)
            return downward[m.group(1)]

        argv = entrypoint() + [re.sub(r"\$\((\w+)\)", expand, a) for a in container.get("args", [])]
        assert argv[:2] == ["serve", "start"], argv
        return argv[2:]
    out = run_start_script(container, pod_name)
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split("\0")[:-1]
    assert argv[:1] == ["start"], argv
    return argv[1:]


def flags(argv):
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def flag_value(argv, flag):
    i = argv.index(flag)
    return argv[i + 1]


def workloads(docs):
    """(workload, pod spec, container) for every container."""
    return [(d, d["spec"]["template"]["spec"], c) for _, d in docs if d["kind"] in ("StatefulSet", "DaemonSet", "Deployment")
            for c in d["spec"]["template"]["spec"]["containers"]]


FAKE_BIN = None


@pytest.fixture(scope="module", autouse=True)
def fake_serve(tmp_path_factory):
    """A `serve` that prints its arguments, NUL-separated."""
    global FAKE_BIN
    FAKE_BIN = str(tmp_path_factory.mktemp("bin"))
    with open(os.path.join(FAKE_BIN, "serve"), "w") as f:
        f.write("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    os.chmod(os.path.join(FAKE_BIN, "serve"), 0o755)
    yield
    FAKE_BIN = None


@pytest.fixture(scope="module")
def docs():
    return load_docs()


@pytest.fixture(scope="module")
def start_help():
    command = [SERVE_BIN] if os.path.exists(SERVE_BIN) else [sys.executable, "-m", "serval.cli"]
    out = subprocess.run([*command, "start", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", out.stdout))


def test_manifests_validate_against_the_kubernetes_schemas(docs):
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["DaemonSet", "PodDisruptionBudget", "Service", "Service", "Service", "StatefulSet"]
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except jsonschema.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_the_flags_passed_to_serve_start_exist(docs, start_help):
    assert {"--head", "--join", "--token-file", "--http-location"} <= start_help
    for workload, _, container in workloads(docs):
        argv = serve_start_argv(container)
        unknown = flags(argv) - start_help
        assert not unknown, f"{workload['metadata']['name']}: `serve start` has no {sorted(unknown)}"


def test_heads_are_a_statefulset_joined_by_stable_names(docs):
    (heads,) = of_kind(docs, "StatefulSet")
    spec = heads["spec"]
    assert spec["replicas"] == 3
    service = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"] == spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    name, service_name = heads["metadata"]["name"], spec["serviceName"]

    def stable(i):
        return f"{name}-{i}.{service_name}.{NAMESPACE}.svc:6390"

    # The first head starts the cluster; the others join it by its name.
    # Every head advertises its own stable name.
    for i in range(spec["replicas"]):
        argv = serve_start_argv(container, pod_name=f"{name}-{i}")
        assert ("--join" in argv) == (i > 0)
        if i > 0:
            assert flag_value(argv, "--join") == stable(0)
        assert flag_value(argv, "--advertise-address") == stable(i)
        assert flag_value(argv, "--control-host") == POD_IP
    assert "--head" in argv and flag_value(argv, "--http-location") == "EveryNode"
    # The data dir lives on the volume claim, so a head keeps its raft log.
    (claim,) = spec["volumeClaimTemplates"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert flag_value(argv, "--data-dir").startswith(mount["mountPath"] + "/")
    assert "requests" in container["resources"] and "limits" in container["resources"]
    # Quorum survives every voluntary disruption the budget allows.
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] >= spec["replicas"] // 2 + 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    # Nodes know every head by its stable name.
    (nodes,) = of_kind(docs, "DaemonSet")
    node_argv = serve_start_argv(nodes["spec"]["template"]["spec"]["containers"][0])
    assert flag_value(node_argv, "--address").split(",") == [
        stable(i) for i in range(spec["replicas"])]
    assert flag_value(node_argv, "--control-host") == POD_IP


def test_the_first_head_starts_no_second_cluster(docs, tmp_path):
    """serval-head-0 with an empty volume asks the other heads' /-/readyz
    (stand-ins here: `getent` finds every name, `python3` prints the
    answer the test picks) and starts a cluster only if none is a member
    of one."""
    (heads,) = of_kind(docs, "StatefulSet")
    (container,) = heads["spec"]["template"]["spec"]["containers"]
    with open(os.path.join(ROOT, "controller", "src", "store", "mod.rs")) as f:
        not_a_member = re.search(r'NOT_A_MEMBER: &str = "([^"]+)"', f.read()).group(1)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("getent", "exit 0"), ("python3", 'printf "%s\\n" "$ANSWER"'),
                         ("serve", "printf '%s\\0' \"$@\"")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    global FAKE_BIN
    saved, FAKE_BIN = FAKE_BIN, str(bin_dir)
    try:
        for answer, starts in ((f"not ready: {not_a_member}", True), ("unreachable", True), ("ok", False),
                               ("not ready: no leader known", False)):
            out = run_start_script(container, "serval-head-0", {"ANSWER": answer})
            assert (out.returncode == 0) == starts, (answer, out.stderr)
            if starts:
                argv = out.stdout.split("\0")[:-1]
                assert argv[0] == "start" and "--join" not in argv, argv
            else:
                assert "not starting a second cluster" in out.stderr
    finally:
        FAKE_BIN = saved


def test_gpu_nodes_request_the_gpus_they_offer(docs):
    (nodes,) = of_kind(docs, "DaemonSet")
    pod = nodes["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (container,) = pod["containers"]
    gpus = flag_value(serve_start_argv(container), "--num-gpus")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(gpus) > 0


def test_probes_and_the_proxy_service_use_real_endpoints(docs):
    with open(os.path.join(ROOT, "proxy", "src", "builtin.rs")) as f:
        healthz = re.search(r'HEALTHZ_PATH: &str = "([^"]+)"', f.read()).group(1)
    with open(os.path.join(ROOT, "proxy", "src", "readiness.rs")) as f:
        readyz = re.search(r'READYZ_PATH: &str = "([^"]+)"', f.read()).group(1)
    (http,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "serval-http"]
    for workload, pod, container in workloads(docs):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        argv = serve_start_argv(container)
        assert ports["http"] == int(flag_value(argv, "--http-port"))
        assert flag_value(argv, "--http-host") == "0.0.0.0"
        ready = container["readinessProbe"]["httpGet"]
        # A head is ready only while it can commit writes (readyz); a node
        # once its proxy holds a snapshot.
        path = readyz if workload["kind"] == "StatefulSet" else healthz
        assert ready["path"] == path and ready["port"] == "http", workload["metadata"]["name"]
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["tcpSocket"]["port"] in ports
        # The EveryNode Service reaches this pod's proxy.
        assert http["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        assert http["spec"]["ports"][0]["targetPort"] == "http"


def test_token_and_tls_come_from_secret_files_only(docs):
    for workload, pod, container in workloads(docs):
        name = workload["metadata"]["name"]
        for env in container.get("env", []):
            assert "TOKEN" not in env["name"].upper() or env["name"].upper().endswith("_FILE"), (name, env)
            assert "secretKeyRef" not in env.get("valueFrom", {}), (name, env)
        assert "envFrom" not in container, name
        argv = serve_start_argv(container)
        assert "--token" not in argv and not any(a.startswith("--token=") for a in argv), name
        text = " ".join(container.get("command", []) + container.get("args", []))
        assert "SERVAL_TOKEN=" not in text, name
        secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
        secret_mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in secrets]
        for flag in ("--token-file", "--tls-cert", "--tls-key", "--tls-ca"):
            path = flag_value(argv, flag)
            assert any(path.startswith(m + "/") for m in secret_mounts), (name, flag, path)


def test_the_image_recipe_builds_the_wheel_and_runs_serve_start(docs):
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert stages[-1][0].startswith("python:3.11")
    build = re.search(r"maturin build .*?-m (\S+)", text.replace("\\\n", " ")).group(1)
    assert os.path.exists(os.path.join(ROOT, build)), build
    for stage in re.findall(r"COPY --from=(\w+)", text):
        assert stage in {name for _, name in stages}
    assert entrypoint() == ["serve", "start"]
    # Volumes and Secret files are owned by the user the image runs as.
    user = int(re.search(r"^USER (\d+)$", text, re.M).group(1))
    for workload, pod, _ in workloads(docs):
        assert pod["securityContext"]["runAsUser"] == user, workload["metadata"]["name"]
