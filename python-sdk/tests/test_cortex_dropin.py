"""Issue 21: projects shaped like Cortex v0.35's test APIs run unchanged:
a handler that reads its model from S3 with boto3 (which Cortex's images
shipped), and a project's own ``deploy.py`` using Cortex's Python client
(``import cortex``)."""

import http.server
import json
import os
import subprocess
import sys
import threading
import textwrap

import requests

from conftest import wait_for
from test_cortex_deploy import cli


class S3StandIn:
    """An S3 stand-in on loopback: ``GET /<bucket>/<key>`` (path style)
    answers the object, anything else S3's NoSuchKey; ``PUT`` stores one in
    ``objects``. Records the requests' Authorization headers, so a test sees
    they came from a signing client. A context manager."""

    def __init__(self, objects: dict):
        requests_seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests_seen.append((self.path, self.headers.get("Authorization", "")))
                data = objects.get(self.path.split("?")[0])
                if data is None:
                    body = b"<Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>"
                    self.send_response(404)
                    self.send_header("Content-Type", "application/xml")
                else:
                    body = data
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("ETag", '"1"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                requests_seen.append((self.path, self.headers.get("Authorization", "")))
                objects[self.path.split("?")[0]] = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("ETag", '"1"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.objects = objects
        self.requests = requests_seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def write(folder, files: dict) -> str:
    for rel, text in files.items():
        path = os.path.join(str(folder), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
    return str(folder)


# A Cortex-style handler that fetches its model from S3 at start, with boto3
# (not in its requirements.txt: Cortex's images had it), credentials from .env.
S3_HANDLER = """
import json
import os

import boto3
from botocore.config import Config


class Handler:
    def __init__(self, config):
        s3 = boto3.client("s3", endpoint_url=config["s3_endpoint"],
                          config=Config(s3={"addressing_style": "path"}))
        obj = s3.get_object(Bucket=config["bucket"], Key=config["key"])
        self.labels = json.loads(obj["Body"].read())

    def handle_post(self, payload):
        return {"label": self.labels[payload["class"]]}
"""


def test_a_handler_that_reads_its_model_from_s3_with_boto3(cluster, tmp_path):
    labels = ["setosa", "versicolor", "virginica"]
    with S3StandIn({"/models/iris/labels.json": json.dumps(labels).encode()}) as s3:
        folder = write(tmp_path / "iris-s3", {
            "handler.py": S3_HANDLER,
            ".env": "AWS_ACCESS_KEY_ID=test-key\nAWS_SECRET_ACCESS_KEY=test-secret\nAWS_DEFAULT_REGION=us-east-1\n",
            "cortex.yaml": f"""
                - name: iris-s3
                  kind: RealtimeAPI
                  handler:
                    type: python
                    path: handler.py
                    config: {{s3_endpoint: "{s3.url}", bucket: models, key: iris/labels.json}}
                """,
        })
        out = cli(cluster, "deploy", folder)
        assert out.returncode == 0, out.stdout + out.stderr
        r = requests.post(f"{cluster.url}/iris-s3", json={"class": 2}, timeout=60)
        assert r.status_code == 200 and r.json() == {"label": "virginica"}, r.text
        # Signed with the .env's key, as boto3 signs.
        assert any(path == "/models/iris/labels.json" and "Credential=test-key/" in auth
                   for path, auth in s3.requests), s3.requests


# -- Cortex's Python client --------------------------------------------------------

# A project with a RealtimeAPI, a gRPC API and a BatchAPI, and its own
# deploy.py written against Cortex 0.35's client, as Cortex's examples and
# end-to-end tests used it.
CLIENT_PROJECT = {
    "cortex.yaml": """
        - name: iris
          kind: RealtimeAPI
          handler:
            type: python
            path: iris.py
            config: {labels: [setosa, versicolor, virginica]}
        - name: squares
          kind: RealtimeAPI
          handler:
            type: python
            path: squares.py
            protobuf_path: squares.proto
        - name: summer
          kind: BatchAPI
          handler:
            type: python
            path: summer.py
        """,
    "iris.py": """
        import sys


        class Handler:
            def __init__(self, config):
                self.labels = config["labels"]
                print("iris handler ready", file=sys.stderr, flush=True)

            def handle_post(self, payload):
                return {"label": self.labels[payload["class"]]}
        """,
    "squares.proto": """
        syntax = "proto3";
        package squares;

        service Squares {
            rpc Predict (Input) returns (stream Output);
        }

        message Input {
            int32 count = 1;
        }

        message Output {
            int64 square = 1;
        }
        """,
    "squares.py": """
        class Handler:
            def __init__(self, config, proto_module_pb2):
                self.pb = proto_module_pb2

            def Predict(self, payload):
                for n in range(1, payload.count + 1):
                    yield self.pb.Output(square=n * n)
        """,
    # Shaped like Cortex 0.35's batch/sum: lists summed per batch, the sums
    # written to S3 with boto3 when the job completes (the endpoint from
    # .env's AWS_ENDPOINT_URL, so the handler names none).
    "summer.py": """
        import json
        import re

        import boto3


        class Handler:
            def __init__(self, config, job_spec):
                self.bucket, prefix = re.match("s3://(.+?)/(.+)", config["dest_s3_dir"]).groups()
                self.key = f"{prefix}/{job_spec['job_id']}.json"
                self.s3 = boto3.client("s3")
                self.sums = []

            def handle_batch(self, payload, batch_id):
                self.sums.extend(sum(numbers) for numbers in payload)

            def on_job_complete(self):
                self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(self.sums))
        """,
    "deploy.py": """
        import importlib
        import json
        import sys
        import tempfile
        import time

        import cortex
        import grpc
        import requests
        import yaml

        cx = cortex.client("serval-test")
        with open("cortex.yaml") as f:
            specs = {s["name"]: s for s in yaml.safe_load(f)}
        out = {}

        # Not waiting: Cortex's deploy result, then polled as Cortex's tests did.
        result = cx.deploy(specs["iris"], project_dir=".")
        out["deploy_result"] = result
        deadline = time.monotonic() + 120
        while cx.get_api("iris")["status"]["status_code"] != "status_live":
            assert time.monotonic() < deadline, cx.get_api("iris")
            time.sleep(0.1)
        iris = cx.get_api("iris")
        out["iris"] = iris
        out["prediction"] = requests.post(iris["endpoint"], json={"class": 1}, timeout=60).json()

        # Waiting: get_api's answer once live.
        squares = cx.deploy(specs["squares"], project_dir=".", wait=True)
        out["squares"] = squares
        stubs = tempfile.mkdtemp()
        from grpc_tools import protoc
        assert protoc.main(["protoc", "-I.", f"--python_out={stubs}", f"--grpc_python_out={stubs}",
                            "squares.proto"]) == 0
        sys.path.insert(0, stubs)
        pb2, pb2_grpc = importlib.import_module("squares_pb2"), importlib.import_module("squares_pb2_grpc")
        channel = grpc.insecure_channel(f"{squares['endpoint']}:{squares['grpc_ports']['insecure']}")
        out["squares_stream"] = [o.square for o in pb2_grpc.SquaresStub(channel).Predict(pb2.Input(count=4),
                                                                                        timeout=60)]

        summer = cx.deploy(specs["summer"], project_dir=".", wait=True)
        job = requests.post(summer["endpoint"], json={
            "workers": 1, "config": {"dest_s3_dir": "s3://results/sums"},
            "item_list": {"items": [[1, 2], [3, 4], [5]], "batch_size": 2}}, timeout=60).json()
        deadline = time.monotonic() + 120
        while cx.get_job("summer", job["job_id"])["job_status"]["status"] != "status_succeeded":
            assert time.monotonic() < deadline, cx.get_job("summer", job["job_id"])
            time.sleep(0.1)
        out["job_id"] = job["job_id"]
        out["summer"] = cx.get_api("summer")

        out["listed"] = sorted(a["spec"]["name"] for a in cx.list_apis())
        cx.delete("squares")
        out["after_delete"] = sorted(a["spec"]["name"] for a in cx.list_apis())
        print(json.dumps(out))
        """,
}


def test_a_projects_deploy_py_with_cortexs_client(cluster, tmp_path):
    with S3StandIn({}) as s3:
        folder = write(tmp_path / "project", CLIENT_PROJECT)
        write(folder, {".env": f"AWS_ENDPOINT_URL={s3.url}\nAWS_ACCESS_KEY_ID=test-key\n"
                               "AWS_SECRET_ACCESS_KEY=test-secret\nAWS_DEFAULT_REGION=us-east-1\n"})
        env = dict(os.environ, SERVAL_DATA_DIR=cluster.data_dir)
        run = subprocess.run([sys.executable, "deploy.py"], cwd=folder, env=env, capture_output=True, text=True,
                             timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])

    result = out["deploy_result"]
    assert set(result) == {"api", "message", "error"} and result["message"] == "creating iris (RealtimeAPI)"
    iris = out["iris"]
    assert set(iris) == {"spec", "status", "endpoint"}, iris
    assert iris["endpoint"] == f"{cluster.url}/iris" and iris["spec"]["name"] == "iris"
    status = iris["status"]
    assert (status["api_name"], status["status_code"]) == ("iris", "status_live") and status["api_id"]
    counts = status["replica_counts"]
    assert counts["requested"] == 1 and counts["updated"]["ready"] == 1 and counts["stale"]["ready"] == 0, counts
    assert out["prediction"] == {"label": "versicolor"}

    squares = out["squares"]
    assert squares["grpc_ports"] == {"insecure": cluster.http_port} and squares["endpoint"] == "127.0.0.1"
    assert squares["status"]["status_code"] == "status_live"
    assert out["squares_stream"] == [1, 4, 9, 16]

    summer = out["summer"]
    assert summer["endpoint"] == f"{cluster.url}/summer"
    (job,) = summer["batch_job_statuses"]
    assert (job["job_id"], job["status"]) == (out["job_id"], "status_succeeded"), job
    # on_job_complete put the batches' sums to S3 (the stand-in), under the job's id.
    assert sorted(json.loads(s3.objects[f"/results/sums/{out['job_id']}.json"])) == [3, 5, 7], s3.objects

    assert out["listed"] == ["iris", "squares", "summer"] and out["after_delete"] == ["iris", "summer"]


def test_stream_api_logs_prints_the_lines(cluster, tmp_path):
    folder = write(tmp_path / "project", {k: CLIENT_PROJECT[k] for k in ("iris.py",)})
    write(folder, {"cortex.yaml": CLIENT_PROJECT["cortex.yaml"].split("        - name: squares")[0]})
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 0, out.stdout + out.stderr
    env = dict(os.environ, SERVAL_DATA_DIR=cluster.data_dir)
    proc = subprocess.Popen([sys.executable, "-c", "import cortex; cortex.client().stream_api_logs('iris')"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # Cortex's stream_api_logs follows until interrupted.
        wait_for(lambda: any("iris handler ready" in line for line in lines), timeout=60,
                 what="the handler's log line")
    finally:
        proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
