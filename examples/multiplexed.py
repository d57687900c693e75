"""Model multiplexing (Ray Serve 2.x's API): one deployment serving many
models, each replica keeping the few it used last.

Run with `.venv/bin/python examples/multiplexed.py`. It starts a local
cluster (HTTP on 127.0.0.1:8000, or SERVAL_HTTP_PORT), deploys two
replicas that load "models" on demand (here a model is a word and a load
takes a moment), sends requests naming models over HTTP (the
`serve_multiplexed_model_id` header) and through a handle
(`options(multiplexed_model_id=...)`), and shows that each model stays on
the replica that loaded it, then shuts the cluster down.
"""

import asyncio
import json
import os
import shutil
import tempfile
import urllib.request

from serval import serve


class FakeModel:
    def __init__(self, model_id):
        self.model_id = model_id

    def predict(self, text):
        return f"{self.model_id} says {text}"

    def __del__(self):
        # Runs when the replica evicts the model (least recently used first).
        print(f"[replica {os.getpid()}] unloaded {self.model_id}", flush=True)


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class Translator:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str):
        await asyncio.sleep(0.2)  # loading weights, say
        return FakeModel(model_id)

    async def __call__(self, request=None):
        model = await self.get_model(serve.get_multiplexed_model_id())
        text = request.query_params.get("text", "hello") if request is not None else "hi"
        return {"answer": model.predict(text), "replica": os.getpid()}


def main():
    http_port = int(os.environ.get("SERVAL_HTTP_PORT", "8000"))
    own_dir = not os.environ.get("SERVAL_DATA_DIR")
    data_dir = tempfile.mkdtemp(prefix="serval-mux-") if own_dir else os.environ["SERVAL_DATA_DIR"]
    serve.start(http_options={"port": http_port}, data_dir=data_dir)
    try:
        handle = serve.run(Translator.bind(), name="translate", route_prefix="/translate")
        url = f"http://127.0.0.1:{http_port}/translate?text=bonjour"
        for model_id in ["french", "german", "french", "french", "german"]:
            req = urllib.request.Request(url, headers={"serve_multiplexed_model_id": model_id})
            with urllib.request.urlopen(req) as r:
                answer = json.loads(r.read())
            print(f"HTTP   {model_id:7} -> replica {answer['replica']}: {answer['answer']}")
        for model_id in ["dutch", "dutch", "dutch"]:
            answer = handle.options(multiplexed_model_id=model_id).remote().result(timeout_s=30)
            print(f"handle {model_id:7} -> replica {answer['replica']}: {answer['answer']}")
    finally:
        serve.shutdown()
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        print("cluster shut down")


if __name__ == "__main__":
    main()
