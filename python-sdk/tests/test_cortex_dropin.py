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

import pytest
import requests

from conftest import wait_for
from test_cortex_deploy import cli


class S3StandIn:
    """An S3 stand-in on loopback: ``GET /<bucket>/<key>`` (path style)
    answers the object, anything else S3's NoSuchKey. Records the requests'
    Authorization headers, so a test sees they came from a signing client.
    A context manager."""

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

            def log_message(self, *args):
                pass

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
