"""Quick start: a local Serval cluster serving a Python class over HTTP and a
ServeHandle. Run with `make demo` (or `.venv/bin/python examples/quickstart.py`).

It starts a head in the background (controller, HTTP proxy on
127.0.0.1:8000, node agent), deploys a counter, calls it both ways, and
shuts the cluster down again.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import serval
from serval import serve


class Counter:
    def __init__(self):
        self.count = 0

    def __call__(self, request):
        self.count += 1
        return {"count": self.count}

    def other_method(self, inc):
        self.count += inc
        return True


def hello(request):
    name = request.query_params.get("name", "world")
    return f"hello, {name}!"


def main():
    http_port = int(os.environ.get("SERVAL_HTTP_PORT", "8000"))
    # A fresh data dir each run: the demo starts an empty cluster, whatever
    # an earlier run (or an older Serval) left in .serval.
    data_dir = tempfile.mkdtemp(prefix="serval-demo-")
    serve.start(http_options={"port": http_port}, data_dir=data_dir)
    try:
        serve.create_backend("counter", Counter)
        serve.create_endpoint("counter", backend="counter", route="/counter")
        serve.create_backend("hello", hello)
        serve.create_endpoint("hello", backend="hello", route="/hello")

        url = f"http://127.0.0.1:{http_port}"
        with urllib.request.urlopen(f"{url}/counter") as r:
            print(f"GET /counter -> {r.status} {r.headers['content-type']} {r.read().decode()}")
        with urllib.request.urlopen(f"{url}/hello?name=serval") as r:
            print(f"GET /hello?name=serval -> {r.read().decode()}")

        handle = serve.get_handle("counter")
        print("handle.remote() ->", handle.remote().result())
        print("other_method(5) ->", serval.get(handle.options(method_name="other_method").remote(5)))
        print("handle.remote() ->", handle.remote().result())

        print("endpoints:", json.dumps(serve.list_endpoints()))
        print(subprocess.run([sys.executable, "-m", "serval.cli", "--data-dir", data_dir, "status"],
                             capture_output=True, text=True).stdout)
    finally:
        serve.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)
        print("cluster shut down")


if __name__ == "__main__":
    main()
