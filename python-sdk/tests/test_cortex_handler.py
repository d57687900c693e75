"""Seed 000, "Handler" (HTTP part): a Cortex Handler class hosted by
``serval.cortex.realtime.RealtimeAPI`` in a real cluster, called over HTTP.
Each test writes its project folder into tmp_path, deploys it as the backend
and endpoint "api" at /api, and uses the seed's own handler code where the
seed gives it."""

import glob
import io
import json
import os
import pickle
import textwrap

import pytest
import requests
from PIL import Image

from conftest import wait_for
from serval import ServeError, serve
from serval.cortex.realtime import RealtimeAPI

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


# -- helpers -----------------------------------------------------------------


def api_spec(dotenv=None, **handler):
    """A validated RealtimeAPI spec as serval.cortex.config produces it, plus
    a key RealtimeAPI does not know (it must be ignored)."""
    return {
        "name": "api",
        "kind": "RealtimeAPI",
        "handler": {
            "type": "python", "path": "handler.py", "config": {}, "python_path": ".", "env": {},
            "log_level": "info", "dependencies": {"pip": "requirements.txt"}, "server_side_batching": None,
            "processes_per_replica": 1, "threads_per_process": 1, **handler,
        },
        "compute": {"cpu": 0.2, "gpu": 0, "mem": None},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "init_replicas": 1},
        "endpoint": "/api",
        "dotenv": dotenv or {},
        "package": None,
        "some_key_from_a_later_version": {"x": 1},
    }


def write_project(folder, files: dict) -> str:
    """Writes ``{relative path: text or bytes}`` under ``folder`` (text is
    dedented, so handler code can be written indented in the test)."""
    for rel, content in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, str):
            with open(path, "w") as f:
                f.write(textwrap.dedent(content))
        else:
            with open(path, "wb") as f:
                f.write(content)
    return str(folder)


def deploy(cluster, tmp_path, handler_code: str, files=None, spec=None) -> str:
    """Deploys handler.py (+ ``files``) as the API "api"; returns its URL."""
    project = write_project(tmp_path / "project", {"handler.py": handler_code, **(files or {})})
    serve.create_backend("api", RealtimeAPI, spec or api_spec(), project)
    serve.create_endpoint("api", backend="api", route="/api", methods=METHODS)
    return f"{cluster.url}/api"


def replica_log(cluster, backend="api") -> str:
    text = ""
    for path in glob.glob(os.path.join(cluster.data_dir, "replicas", f"{backend}_*", "replica.log")):
        with open(path, errors="replace") as f:
            text += f.read()
    return text


def png_bytes(size=(7, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


# -- requests: payload, query_params, headers --------------------------------

ARGS_HANDLER = """
    class Handler:
        def __init__(self, config):
            pass

        def handle_post(self, payload):
            print(payload["key"])  # prints "value"
            return {"key": payload["key"]}

        def handle_get(self, query_params):
            return {"query_params": query_params, "type": type(query_params).__name__}

        def handle_put(self, headers, payload, query_params):
            return {"payload": payload, "q": query_params, "token": headers["x-token"],
                    "type": type(headers).__name__}

        def handle_patch(self, query_params, headers):
            # No payload: the body is never read, so a malformed one is fine.
            return {"q": query_params, "token": headers.get("x-token")}

        async def handle_delete(self):
            return "deleted"
"""


def test_json_payload_and_request_args_by_name(cluster, tmp_path):
    url = deploy(cluster, tmp_path, ARGS_HANDLER)

    # The seed's curl: -X POST -H "Content-Type: application/json" -d '{"key": "value"}'
    r = requests.post(url, data='{"key": "value"}', headers={"Content-Type": "application/json"}, timeout=30)
    assert (r.status_code, r.json()) == (200, {"key": "value"})

    r = requests.get(url, params={"a": "1", "b": "two"}, timeout=30)
    assert r.json() == {"query_params": {"a": "1", "b": "two"}, "type": "dict"}

    r = requests.put(f"{url}?x=y", json=[1, 2], headers={"X-Token": "t1"}, timeout=30)
    assert r.json() == {"payload": [1, 2], "q": {"x": "y"}, "token": "t1", "type": "dict"}

    r = requests.patch(f"{url}?p=q", data="{not json", headers={"Content-Type": "application/json",
                                                                "X-Token": "t2"}, timeout=30)
    assert (r.status_code, r.json()) == (200, {"q": {"p": "q"}, "token": "t2"})

    r = requests.delete(url, timeout=30)
    assert (r.status_code, r.text) == (200, "deleted")


def test_binary_payloads_pickle_and_image(cluster, tmp_path):
    url = deploy(cluster, tmp_path, """
        import io
        import pickle

        from PIL import Image

        class Handler:
            def __init__(self, config):
                pass

            def handle_post(self, payload):
                obj = pickle.loads(payload)
                print(obj["key"])  # prints "value"
                return {"key": obj["key"], "type": type(payload).__name__}

            def handle_put(self, payload, headers):
                img = Image.open(io.BytesIO(payload))  # read the payload bytes as an image
                print(img.size)
                return {"size": list(img.size), "format": img.format}
    """)
    octet = {"Content-Type": "application/octet-stream"}
    r = requests.post(url, data=pickle.dumps({"key": "value"}), headers=octet, timeout=30)
    assert (r.status_code, r.json()) == (200, {"key": "value", "type": "bytes"})
    r = requests.put(url, data=png_bytes((7, 5)), headers=octet, timeout=30)
    assert (r.status_code, r.json()) == (200, {"size": [7, 5], "format": "PNG"})


def test_multipart_form_with_files(cluster, tmp_path):
    url = deploy(cluster, tmp_path, """
        from PIL import Image
        import pickle

        class Handler:
            def __init__(self, config):
                self.files = []

            def handle_post(self, payload):
                text = payload["text"].file.read()
                print(text.decode("utf-8"))  # prints the contents of text.txt

                obj = pickle.load(payload["object"].file)
                print(obj["key"])  # prints "value"

                img = Image.open(payload["image"].file)
                print(img.size)  # prints the dimensions of image.png

                self.files = [payload[k].file for k in ("text", "object", "image")]
                return {"text": text.decode("utf-8"), "key": obj["key"], "size": list(img.size),
                        "filename": payload["image"].filename, "open": not any(f.closed for f in self.files)}

            def handle_get(self):
                return {"closed": [f.closed for f in self.files]}
    """)
    # The seed's curl: -F "text=@text.txt" -F "object=@object.pkl" -F "image=@image.png"
    files = {
        "text": ("text.txt", "hello from text.txt".encode()),
        "object": ("object.pkl", pickle.dumps({"key": "value"})),
        "image": ("image.png", png_bytes((3, 4))),
    }
    r = requests.post(url, files=files, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"text": "hello from text.txt", "key": "value", "size": [3, 4],
                        "filename": "image.png", "open": True}
    # The uploads were open while the handler ran and are closed after.
    assert requests.get(url, timeout=30).json() == {"closed": [True, True, True]}


TEXT_HANDLER = """
    from starlette.datastructures import FormData

    class Handler:
        def __init__(self, config):
            self.calls = 0

        def handle_post(self, payload):
            self.calls += 1
            value = dict(payload) if isinstance(payload, FormData) else payload
            if isinstance(value, bytes):
                value = value.hex()
            return {"type": type(payload).__name__, "value": value}

        def handle_get(self):
            return {"calls": self.calls}
"""


def test_form_text_plain_text_and_bad_bodies(cluster, tmp_path):
    url = deploy(cluster, tmp_path, TEXT_HANDLER)

    def post(data, content_type=None):
        headers = {"Content-Type": content_type} if content_type else {}
        return requests.post(url, data=data, headers=headers, timeout=30)

    # The seed's curl -d "key=value" sends application/x-www-form-urlencoded.
    r = post("key=value", "application/x-www-form-urlencoded")
    assert r.json() == {"type": "FormData", "value": {"key": "value"}}
    r = post("hello world", "text/plain")
    assert r.json() == {"type": "str", "value": "hello world"}
    r = post("héllo wörld".encode("utf-8"), "text/plain")
    assert r.json()["value"] == "héllo wörld"
    r = post("café".encode("latin-1"), "text/plain; charset=latin-1")
    assert r.json() == {"type": "str", "value": "café"}
    # Media type case-insensitive, parameters other than charset ignored.
    r = post("ça".encode("latin-1"), 'Text/Plain; format=flowed; Charset="ISO-8859-1"')
    assert r.json() == {"type": "str", "value": "ça"}
    r = post(b'{"a": 1}', "Application/JSON; charset=utf-8")
    assert r.json() == {"type": "dict", "value": {"a": 1}}
    # Anything else, or no Content-Type at all: the raw bytes.
    assert post(b"\x00\x01", "application/octet-stream").json() == {"type": "bytes", "value": "0001"}
    assert post(b"\x02\x03").json() == {"type": "bytes", "value": "0203"}
    assert post(b"<a/>", "application/xml").json() == {"type": "bytes", "value": b"<a/>".hex()}
    calls = requests.get(url, timeout=30).json()["calls"]
    assert calls == 9

    # Bodies that cannot be read as their Content-Type says: 400, user code not called.
    for data, content_type, words in [
        ('{"key": ', "application/json", "not valid JSON"),
        ("", "application/json", "not valid JSON"),
        (b"\xff\xfe\xfa", "text/plain", "utf-8"),
        ("x", "text/plain; charset=no-such-charset", "no-such-charset"),
        ("--x\r\nbroken", "multipart/form-data", "multipart/form-data"),
    ]:
        r = post(data, content_type)
        assert r.status_code == 400, (content_type, r.text)
        assert r.headers["content-type"] == "application/json"
        assert words in r.json()["error"], r.json()
    assert requests.get(url, timeout=30).json() == {"calls": calls}


# -- responses ---------------------------------------------------------------


def test_responses_by_type(cluster, tmp_path):
    url = deploy(cluster, tmp_path, """
        from starlette.responses import JSONResponse

        class Handler:
            def __init__(self, config):
                pass

            def handle_get(self, query_params):
                kind = query_params["kind"]
                if kind == "dict":
                    return {"label": "class 1", "scores": [0.1, 0.9]}
                if kind == "list":
                    return [1, 2.5, None]
                if kind == "str":
                    return "class 1"
                if kind == "bytes":
                    return bytes(4)
                if kind == "response":
                    return JSONResponse({"created": True}, status_code=201, headers={"X-Custom": "yes"})
                return object()
    """)

    def get(kind):
        return requests.get(url, params={"kind": kind}, timeout=30)

    r = get("dict")
    assert (r.status_code, r.headers["content-type"], r.json()) == \
        (200, "application/json", {"label": "class 1", "scores": [0.1, 0.9]})
    assert get("list").json() == [1, 2.5, None]
    r = get("str")
    assert (r.text, r.headers["content-type"]) == ("class 1", "text/plain; charset=utf-8")
    r = get("bytes")
    assert (r.content, r.headers["content-type"]) == (b"\x00" * 4, "application/octet-stream")
    r = get("response")
    assert (r.status_code, r.json(), r.headers["x-custom"], r.headers["content-type"]) == \
        (201, {"created": True}, "yes", "application/json")
    r = get("object")
    assert r.status_code == 500 and "not JSON serializable" in r.json()["error"]


def test_missing_verb_is_405_and_handler_error_is_500(cluster, tmp_path):
    url = deploy(cluster, tmp_path, """
        class Handler:
            def __init__(self, config):
                pass

            def handle_post(self, payload):
                raise ValueError(f"cannot classify {payload['text']}")

            def handle_delete(self):
                return "gone"
    """)
    for method in ("GET", "PUT", "PATCH", "HEAD", "OPTIONS"):
        r = requests.request(method, url, timeout=30)
        assert r.status_code == 405, method
        assert r.headers["allow"] == "POST, DELETE", method
        if method != "HEAD":
            assert method in r.json()["error"]
    r = requests.post(url, json={"text": "this"}, timeout=30)
    assert r.status_code == 500
    assert r.json() == {"error": "ValueError: cannot classify this"}
    assert requests.delete(url, timeout=30).text == "gone"


# -- the process: project files, environment, python_path --------------------


def test_project_files_environment_and_python_path(cluster, tmp_path):
    spec = api_spec(
        dotenv={"FROM_DOTENV": "dotenv", "BOTH": "dotenv"},
        env={"BOTH": "handler-env", "ONLY_ENV": "yes"},
        python_path="lib",
        config={"greeting": "hi"},
    )
    url = deploy(cluster, tmp_path, """
        import json
        import os
        import pickle

        from helpers import shout  # lib/helpers.py, on sys.path through python_path

        class Point:
            def __init__(self, x):
                self.x = x

        class Handler:
            def __init__(self, config):
                with open('values.json', 'r') as values_file:
                    values = json.load(values_file)
                self.values = values
                self.config = config

            def handle_get(self):
                return {
                    "values": self.values,
                    "config": self.config,
                    "cwd_is_project": os.path.samefile(os.getcwd(), os.path.dirname(__file__)),
                    "env": {k: os.environ.get(k) for k in ("FROM_DOTENV", "BOTH", "ONLY_ENV")},
                    "shout": shout(self.config["greeting"]),
                    # Classes of the handler module pickle by reference.
                    "pickled": pickle.loads(pickle.dumps(Point(3))).x,
                }
    """, files={"values.json": json.dumps({"labels": ["a", "b"]}),
                "lib/helpers.py": "def shout(s):\n    return s.upper() + '!'\n"}, spec=spec)
    assert requests.get(url, timeout=30).json() == {
        "values": {"labels": ["a", "b"]},
        "config": {"greeting": "hi"},
        "cwd_is_project": True,
        "env": {"FROM_DOTENV": "dotenv", "BOTH": "handler-env", "ONLY_ENV": "yes"},
        "shout": "HI!",
        "pickled": 3,
    }


@pytest.mark.parametrize("code, words", [
    ("class NotAHandler:\n    pass\n", "defines no class named Handler"),
    ("class Handler:\n    def __init__(self, config):\n        raise KeyError('model.bin')\n",
     "Handler.__init__ failed: KeyError"),
    ("class Handler:\n    def __init__(self, config):\n        pass\n", "Handler defines none of handle_post"),
    ("class Handler:\n    def handle_post(self, payload, model):\n        pass\n",
     "Handler.handle_post requires an argument 'model'"),
])
def test_a_handler_that_cannot_start_fails_the_deploy(cluster, tmp_path, code, words):
    with pytest.raises(ServeError, match="failed to start") as info:
        deploy(cluster, tmp_path, code)
    assert words in str(info.value)


# -- callbacks ---------------------------------------------------------------


def test_callback_runs_after_the_response_was_sent(cluster, tmp_path):
    gate, marker = tmp_path / "gate", tmp_path / "marker"
    url = deploy(cluster, tmp_path, """
        import os
        import time

        class Handler:
            def __init__(self, config):
                self.gate, self.marker = config["gate"], config["marker"]

            def handle_post(self, payload):
                def _callback():
                    # Waits for the test, which opens the gate only once it
                    # holds the response: the callback runs after the send.
                    deadline = time.monotonic() + 60
                    while not os.path.exists(self.gate) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    with open(self.marker, "w") as f:
                        f.write("after gate" if os.path.exists(self.gate) else "timed out")
                return "results", _callback
    """, spec=api_spec(config={"gate": str(gate), "marker": str(marker)}))
    r = requests.post(url, json={"key": "value"}, timeout=30)
    assert (r.status_code, r.text) == (200, "results")
    assert not marker.exists()
    gate.touch()
    wait_for(marker.exists, timeout=60, what="the callback's marker")
    wait_for(lambda: marker.read_text() == "after gate", what="the marker's content")


def test_failing_callback_is_logged_and_the_replica_keeps_serving(cluster, tmp_path):
    url = deploy(cluster, tmp_path, """
        from starlette.responses import JSONResponse

        class Handler:
            def __init__(self, config):
                self.n = 0

            def handle_post(self, payload):
                self.n += 1
                def _callback():
                    raise RuntimeError("callback exploded")
                return {"n": self.n}, _callback

            def handle_put(self):
                async def _callback():
                    raise RuntimeError("async callback exploded")
                return JSONResponse({"put": True}, status_code=202), _callback
    """)
    for n in (1, 2):
        r = requests.post(url, json={}, timeout=30)
        assert (r.status_code, r.json()) == (200, {"n": n})
    r = requests.put(url, timeout=30)
    assert (r.status_code, r.json()) == (202, {"put": True})
    log = wait_for(lambda: (lambda t: "async callback exploded" in t and t)(replica_log(cluster)),
                   what="the callback errors in the replica log")
    assert log.count("RuntimeError: callback exploded") == 2
    assert "serval.cortex" in log and "Traceback (most recent call last)" in log
    assert requests.post(url, json={}, timeout=30).json() == {"n": 3}
