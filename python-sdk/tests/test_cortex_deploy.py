"""`serve deploy|get|delete` and serval.client() on Cortex project folders,
against a real cluster: the package goes through the cluster's blob store,
replicas run the Handler in the unpacked project."""

import json
import os
import shutil
import subprocess
import sys

import requests
from conftest import wait_for

import serval
from serval import serve

from test_cortex_config import make_wheel

HANDLER = '''
import json
import os

VERSION = {version}


class Handler:
    def __init__(self, config):
        with open("values.json") as f:
            self.values = json.load(f)
        self.config = config

    def handle_post(self, payload):
        return {{"echo": payload, "values": self.values, "config": self.config,
                 "greeting": os.environ.get("GREETING"), "version": VERSION}}

    def handle_get(self, query_params):
        return {{"query": query_params, "version": VERSION, "pid": os.getpid()}}
'''

CONFIG = """
- name: iris
  kind: RealtimeAPI
  handler:
    type: python
    path: handler.py
    config: {model: small}
"""


def write_project(folder, version=1, config=CONFIG, files=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "handler.py"), "w") as f:
        f.write(HANDLER.format(version=version))
    with open(os.path.join(folder, "values.json"), "w") as f:
        json.dump({"labels": ["setosa", "versicolor"]}, f)
    with open(os.path.join(folder, ".env"), "w") as f:
        f.write("GREETING=hello\n")
    with open(os.path.join(folder, "serve.yaml"), "w") as f:
        f.write(config)
    for rel, text in (files or {}).items():
        with open(os.path.join(folder, rel), "w") as f:
            f.write(text)
    return str(folder)


def cli(cluster, *args):
    """`serve ARGS` against the test's cluster, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "serval.cli", "--data-dir", cluster.data_dir, *args],
                          capture_output=True, text=True, timeout=600)


def replica_pids(backend):
    return sorted(r["pid"] for r in serve.status()["replicas"]
                  if r["backend"] == backend and r["state"] == "running")


def test_deploy_get_redeploy_and_delete(cluster, tmp_path):
    folder = write_project(tmp_path / "iris")
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 0, out.stderr
    assert "iris: created" in out.stdout

    r = requests.post(f"{cluster.url}/iris", json={"x": [1, 2]}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"echo": {"x": [1, 2]}, "values": {"labels": ["setosa", "versicolor"]},
                        "config": {"model": "small"}, "greeting": "hello", "version": 1}
    r = requests.get(f"{cluster.url}/iris?a=1", timeout=30)
    assert r.json()["query"] == {"a": "1"}

    got = cli(cluster, "get")
    assert got.returncode == 0 and "iris" in got.stdout and "live" in got.stdout, got.stdout
    one = json.loads(cli(cluster, "get", "iris", "--json").stdout)
    assert one["status"] == "live" and one["endpoint"] == "/iris" and one["replicas"] == {"running": 1}

    # Unchanged: nothing happens, the same replica keeps serving.
    serve.connect(data_dir=cluster.data_dir)
    before = replica_pids("iris")
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 0 and "iris: unchanged" in out.stdout, out.stdout + out.stderr
    assert replica_pids("iris") == before

    # Changed code: rolled out.
    write_project(tmp_path / "iris", version=2)
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 0 and "iris: updated" in out.stdout, out.stdout + out.stderr
    assert requests.get(f"{cluster.url}/iris", timeout=30).json()["version"] == 2

    out = cli(cluster, "delete", "iris")
    assert out.returncode == 0, out.stderr
    assert requests.get(f"{cluster.url}/iris", timeout=30).status_code == 404
    assert "no APIs are deployed" in cli(cluster, "get").stdout
    assert cli(cluster, "get", "iris").returncode == 1


def test_an_invalid_api_deploys_nothing(cluster, tmp_path):
    config = CONFIG + """
- name: second
  kind: RealtimeAPI
  handler: {path: handler.py}
  autoscaling: {min_replicas: many}
"""
    folder = write_project(tmp_path / "bad", config=config)
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 1
    assert 'api "second": autoscaling.min_replicas: must be an integer' in out.stderr, out.stderr
    assert "no APIs are deployed" in cli(cluster, "get").stdout
    assert requests.get(f"{cluster.url}/iris", timeout=30).status_code == 404


def test_a_handler_that_cannot_start_is_reported(cluster, tmp_path):
    folder = write_project(tmp_path / "broken", config=CONFIG.replace("iris", "broken"))
    with open(os.path.join(folder, "handler.py"), "a") as f:
        f.write("\n\nclass Handler:\n    def __init__(self, config):\n        raise RuntimeError('no model file')\n")
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 1 and "no model file" in out.stderr, out.stderr
    st = json.loads(cli(cluster, "get", "broken", "--json").stdout)
    assert st["status"] == "error" and "no model file" in st["last_error"]


def test_requirements_are_installed_for_the_api(cluster, tmp_path):
    folder = tmp_path / "deps"
    folder.mkdir()
    wheel = make_wheel(folder, name="greetlib", source="def hello():\n    return 'hi from greetlib'\n")
    write_project(folder, files={
        "requirements.txt": f"./{wheel}\n",
        "handler.py": "import greetlib\n\nclass Handler:\n    def __init__(self, config):\n        pass\n\n"
                      "    def handle_get(self):\n        return greetlib.hello()\n",
    })
    out = cli(cluster, "deploy", str(folder))
    assert out.returncode == 0, out.stderr
    assert requests.get(f"{cluster.url}/iris", timeout=30).text == "hi from greetlib"


def test_replicas_fetch_the_package_from_the_cluster(cluster, tmp_path):
    folder = write_project(tmp_path / "gone")
    assert cli(cluster, "deploy", folder).returncode == 0
    shutil.rmtree(folder)
    # A replica started now cannot read the deploy folder nor the node's
    # unpacked copy: it must fetch the package from the cluster's store.
    shutil.rmtree(os.path.join(cluster.data_dir, "cache"), ignore_errors=True)
    serve.connect(data_dir=cluster.data_dir)
    (pid,) = replica_pids("iris")
    os.kill(pid, 9)
    wait_for(lambda: replica_pids("iris") not in ([], [pid]), timeout=120, what="the replica's restart")
    r = requests.post(f"{cluster.url}/iris", json=1, timeout=30)
    assert r.status_code == 200 and r.json()["values"] == {"labels": ["setosa", "versicolor"]}


def test_traffic_splitter(cluster, tmp_path):
    config = CONFIG + CONFIG.replace("name: iris", "name: iris-v2") + """
- name: split
  kind: TrafficSplitter
  apis:
    - {name: iris, weight: 100}
    - {name: iris-v2, weight: 0}
"""
    folder = write_project(tmp_path / "split", config=config)
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 0, out.stderr
    serve.connect(data_dir=cluster.data_dir)
    (v1,) = replica_pids("iris")
    (v2,) = replica_pids("iris-v2")
    assert {requests.get(f"{cluster.url}/split", timeout=30).json()["pid"] for _ in range(10)} == {v1}
    with open(os.path.join(folder, "serve.yaml"), "w") as f:
        f.write(config.replace("weight: 100", "weight: X").replace("weight: 0", "weight: 100")
                .replace("weight: X", "weight: 0"))
    out = cli(cluster, "deploy", folder)
    assert "split: updated" in out.stdout and "iris: unchanged" in out.stdout, out.stdout + out.stderr
    assert {requests.get(f"{cluster.url}/split", timeout=30).json()["pid"] for _ in range(10)} == {v2}
    # An API a splitter uses cannot be deleted before the splitter.
    assert "used by the TrafficSplitter" in cli(cluster, "delete", "iris-v2").stderr


def test_the_python_client(cluster, tmp_path):
    folder = write_project(tmp_path / "client")
    c = serval.client(data_dir=cluster.data_dir)
    assert [r["action"] for r in c.deploy(folder)] == ["created"]
    assert [a["name"] for a in c.list_apis()] == ["iris"]
    assert c.get_api("iris")["status"] == "live"
    # Cortex's defaults reach the backend: update_strategy bounds the
    # rolling update, autoscaling targets processes x threads.
    config = serve.get_backend_config("iris")
    assert (config["max_surge"], config["max_unavailable"]) == ("25%", "25%")
    assert config["autoscaling"]["target_replica_concurrency"] == 1.0
    assert config["num_cpus"] == 0.2
    c.delete("iris")
    assert c.list_apis() == []


CHAIN_CONFIG = """
- name: text-generator
  kind: RealtimeAPI
  handler: {path: generator.py}
- name: caller
  kind: RealtimeAPI
  handler: {path: caller.py}
"""

GENERATOR = """
class Handler:
    def __init__(self, config):
        pass

    def handle_post(self, payload):
        return {"generated": payload["text"] + " is fun"}
"""

# Written for Cortex: `import cortex` and its logger work unchanged.
CALLER = """
import os

import cortex
import requests
from cortex_internal.lib.log import logger as cortex_logger

import serval
from serval import serve


class Handler:
    def __init__(self, config):
        # get client pointing to the default environment
        client = cortex.client()
        self.existing_apis = sorted(a["spec"]["name"] for a in client.list_apis())

    def handle_post(self, payload):
        cortex_logger.info("received payload", extra={"payload": payload})
        over_http = requests.post(serval.api_url("text-generator"), json=payload, timeout=30).json()
        handle = serve.get_handle("text-generator").options(http_method="POST")
        through_handle = handle.remote(payload).result()
        return {"http": over_http, "handle": through_handle, "apis": self.existing_apis,
                "proxy": os.environ.get("SERVAL_PROXY_URL")}
"""


def test_a_handler_chains_to_another_api_by_name(cluster, tmp_path):
    folder = write_project(tmp_path / "chain", config=CHAIN_CONFIG,
                           files={"generator.py": GENERATOR, "caller.py": CALLER})
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 0, out.stderr
    r = requests.post(f"{cluster.url}/caller", json={"text": "machine learning"}, timeout=60)
    assert r.status_code == 200, r.text
    expected = {"generated": "machine learning is fun"}
    body = r.json()
    assert (body["http"], body["handle"]) == (expected, expected)
    # Deployed in order: the caller saw the generator (and itself) at start.
    assert "text-generator" in body["apis"]
    assert body["proxy"] == cluster.url


def test_compute_unavailable_is_reported(cluster, tmp_path):
    folder = write_project(tmp_path / "huge", config=CONFIG + "  compute: {cpu: 1000}\n")
    out = cli(cluster, "deploy", "--no-wait", folder)
    assert out.returncode == 0, out.stderr
    st = json.loads(cli(cluster, "get", "iris", "--json").stdout)
    assert st["status"] == "compute unavailable", st


RECORDER = """
import os


class Handler:
    def __init__(self, config):
        self.path = config["record"]

    def handle_post(self, payload):
        with open(self.path, "a") as f:
            f.write(str(payload) + "\\n")
        return os.path.basename(self.path)
"""


def test_a_traffic_splitter_shadow_gets_copies(cluster, tmp_path):
    live_log, shadow_log = str(tmp_path / "live.log"), str(tmp_path / "shadow.log")
    config = f"""
- name: live
  kind: RealtimeAPI
  handler: {{path: recorder.py, config: {{record: {live_log}}}}}
- name: candidate
  kind: RealtimeAPI
  handler: {{path: recorder.py, config: {{record: {shadow_log}}}}}
- name: split
  kind: TrafficSplitter
  apis:
    - {{name: live, weight: 100}}
    - {{name: candidate, weight: 100, shadow: true}}
"""
    folder = write_project(tmp_path / "shadow", config=config, files={"recorder.py": RECORDER})
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 0, out.stderr
    for i in range(5):
        r = requests.post(f"{cluster.url}/split", json=i, timeout=30)
        assert r.text == "live.log", r.text  # clients only ever see the live API
    wait_for(lambda: os.path.exists(shadow_log) and len(open(shadow_log).read().split()) == 5,
             timeout=60, what="a copy of every request at the shadow")
    assert sorted(open(shadow_log).read().split()) == sorted(open(live_log).read().split())


def test_the_iris_example_is_trained_deployed_and_queried(cluster, tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "iris")
    folder = tmp_path / "iris"
    shutil.copytree(example, folder, ignore=shutil.ignore_patterns("model.pkl"))
    # The build step, as the example's README runs it.
    trained = subprocess.run([sys.executable, str(folder / "train.py")], capture_output=True, text=True,
                             timeout=300)
    assert trained.returncode == 0 and (folder / "model.pkl").is_file(), trained.stdout + trained.stderr
    out = cli(cluster, "deploy", str(folder))
    assert out.returncode == 0 and "iris-classifier: created" in out.stdout, out.stdout + out.stderr

    url = f"{cluster.url}/iris-classifier"
    with open(folder / "sample.json") as f:
        r = requests.post(url, data=f.read(), headers={"Content-Type": "application/json"}, timeout=30)
    # A str is sent as text, as Cortex did; a list as JSON.
    assert r.status_code == 200 and r.text == "setosa", r.text
    flowers = [[5.1, 3.5, 1.4, 0.2], [5.9, 2.8, 4.4, 1.3], [6.9, 3.1, 5.4, 2.1]]
    names = ("sepal_length", "sepal_width", "petal_length", "petal_width")
    r = requests.post(url, json=[dict(zip(names, f)) for f in flowers], timeout=30)
    assert r.json() == ["setosa", "versicolor", "virginica"], r.text
    assert requests.get(url, timeout=30).json() == {"labels": ["setosa", "versicolor", "virginica"]}
    # A sample without a field is the handler's error: 500, and it keeps serving.
    assert requests.post(url, json={"sepal_length": 1}, timeout=30).status_code == 500
    assert requests.post(url, json=[dict(zip(names, flowers[2]))], timeout=30).json() == ["virginica"]

    client = serval.client(data_dir=cluster.data_dir)
    assert client.get_api("iris-classifier")["status"] == "live"
    lines = wait_for(lambda: [line for _, line in client.stream_api_logs("iris-classifier", follow=False)
                              if '"model loaded"' in line], what="the handler's log line")
    assert json.loads(lines[0])["model"] == "model.pkl", lines
    client.delete("iris-classifier")


SLOW_START = '''
import os
import time

class Handler:
    def __init__(self, config):
        # Version 2 starts only once the test lets it.
        while config["version"] == 2 and not os.path.exists(config["gate"]):
            time.sleep(0.05)
        self.version = config["version"]

    def handle_get(self):
        return {"version": self.version}
'''


def test_get_shows_updating_while_a_rollout_runs(cluster, tmp_path):
    gate = tmp_path / "go"

    def deploy(version, *flags):
        config = (f"- name: slow\n  kind: RealtimeAPI\n  handler:\n    path: handler.py\n"
                  f"    config: {{version: {version}, gate: '{gate}'}}\n")
        folder = write_project(tmp_path / "slow", config=config, files={"handler.py": SLOW_START})
        return cli(cluster, "deploy", folder, *flags)

    out = deploy(1)
    assert out.returncode == 0 and "slow: created" in out.stdout, out.stdout + out.stderr
    out = deploy(2, "--no-wait")
    assert out.returncode == 0 and "slow: updated" in out.stdout, out.stdout + out.stderr

    def status():
        got = cli(cluster, "get", "slow", "--json")
        assert got.returncode == 0, got.stderr
        return json.loads(got.stdout)

    assert status()["status"] == "updating"
    assert "updating" in cli(cluster, "get").stdout
    # The old replica keeps answering during the rollout.
    assert requests.get(f"{cluster.url}/slow", timeout=30).json() == {"version": 1}
    gate.touch()
    wait_for(lambda: status()["status"] == "live", timeout=120, what="the rollout to finish")
    wait_for(lambda: requests.get(f"{cluster.url}/slow", timeout=30).json() == {"version": 2},
             what="version 2 to answer")


SECRET_HANDLER = '''
import os


class Handler:
    def __init__(self, config):
        pass

    def handle_get(self):
        return {"secret": os.environ.get("API_KEY"),
                "seen": sorted(k for k, v in os.environ.items() if "s3cr3t" in v)}
'''


def test_dotenv_values_reach_only_their_own_api_s_replicas(cluster, tmp_path):
    import secrets

    secret = f"s3cr3t-{secrets.token_hex(8)}"
    files = {"handler.py": SECRET_HANDLER}
    with_env = write_project(tmp_path / "with-env", config=CONFIG.replace("name: iris", "name: keyed"), files=files)
    with open(os.path.join(with_env, ".env"), "w") as f:
        f.write(f"API_KEY={secret}\n")
    other = write_project(tmp_path / "other", config=CONFIG.replace("name: iris", "name: other"), files=files)
    for folder in (with_env, other):
        out = cli(cluster, "deploy", folder)
        assert out.returncode == 0, out.stderr
    # The API's handler has it; another API's replica does not.
    assert requests.get(f"{cluster.url}/keyed", timeout=30).json() == {"secret": secret, "seen": ["API_KEY"]}
    assert requests.get(f"{cluster.url}/other", timeout=30).json() == {"secret": None, "seen": []}
    # Neither what every Watch client receives, nor the CLI's views.
    assert secret not in json.dumps(serve.status())
    for args in (("status",), ("get",), ("get", "keyed")):
        out = cli(cluster, *args)
        assert out.returncode == 0 and secret not in out.stdout + out.stderr, (args, out.stdout)
    # Nor the backend's code that node agents fetch by digest for replicas.
    codes = [os.path.join(root, n) for root, _, names in os.walk(cluster.data_dir)
             if os.path.basename(root) == "code" for n in names if n.endswith(".pkl")]
    assert codes and not [c for c in codes if secret.encode() in open(c, "rb").read()]
    # An unchanged .env is the same blob: the redeploy changes nothing.
    out = cli(cluster, "deploy", with_env)
    assert out.returncode == 0 and "unchanged" in out.stdout, out.stdout
    # A changed one rolls the replicas with the new value.
    with open(os.path.join(with_env, ".env"), "w") as f:
        f.write(f"API_KEY={secret}-2\n")
    out = cli(cluster, "deploy", with_env)
    assert out.returncode == 0 and "updated" in out.stdout, out.stdout
    assert requests.get(f"{cluster.url}/keyed", timeout=30).json()["secret"] == f"{secret}-2"
