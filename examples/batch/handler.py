"""Counts the words of JSON-lines records ({"text": ...}): each batch writes
its counts to <out>/<batch_id>.json; on_job_complete adds them up into
<out>/totals.json."""

import collections
import json
import os
import re


class Handler:
    def __init__(self, config, job_spec):
        self.out = config["out"]
        self.min_length = int(config.get("min_length", 1))
        self.job_id = job_spec["job_id"]
        os.makedirs(self.out, exist_ok=True)

    def handle_batch(self, payload, batch_id):
        counts = collections.Counter(
            w for record in payload for w in re.findall(r"[a-z']+", record["text"].lower())
            if len(w) >= self.min_length)
        # Written whole then renamed: a batch that runs again (at least once
        # delivery) replaces its file, it never adds to it.
        path = os.path.join(self.out, f"{batch_id}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(counts, f)
        os.replace(path + ".tmp", path)

    def on_job_complete(self):
        totals = collections.Counter()
        for name in os.listdir(self.out):
            if name.endswith(".json") and name != "totals.json":
                with open(os.path.join(self.out, name)) as f:
                    totals.update(json.load(f))
        with open(os.path.join(self.out, "totals.json"), "w") as f:
            json.dump({"job_id": self.job_id, "top": totals.most_common(10)}, f, indent=1)
