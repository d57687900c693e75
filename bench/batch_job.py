"""A no-op batch job of 1,000,000 small items in batches of 100 (10,000
batches) on 2 workers (issue 9, part 6). Not run by the tests.

Starts a Serval head on free ports in a temp data dir, deploys a BatchAPI
whose handle_batch does nothing, submits the job over HTTP and polls its
status until it ends. Prints the time to enqueue (submit -> running), the
time to run (running -> succeeded) and the batches/s the queue sustained,
then stops everything it started.

    python bench/batch_job.py [--items 1000000] [--batch-size 100] [--workers 2]

Run it with a release build (`bench/run batch` builds one into bench/.venv).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_batching import free_port, start_cluster, stop_cluster  # noqa: E402  (bench/ is not a package)

HANDLER = """class Handler:
    def __init__(self, config, job_spec):
        pass

    def handle_batch(self, payload, batch_id):
        pass
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    from serval.cortex.deploy import deploy

    workdir = tempfile.mkdtemp(prefix="batch-bench-")
    data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    http_port = free_port()
    try:
        start_cluster(data_dir, http_port)
        folder = os.path.join(workdir, "noop")
        os.makedirs(folder)
        with open(os.path.join(folder, "handler.py"), "w") as f:
            f.write(HANDLER)
        with open(os.path.join(folder, "serve.yaml"), "w") as f:
            f.write("- name: noop\n  kind: BatchAPI\n  handler: {path: handler.py}\n")
        deploy(folder)
        url = f"http://127.0.0.1:{http_port}/noop"
        body = json.dumps({"workers": args.workers,
                           "item_list": {"items": list(range(args.items)), "batch_size": args.batch_size}})
        t0 = time.monotonic()
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=300)
        r.raise_for_status()
        job_id = r.json()["job_id"]
        t_running = None
        while True:
            st = requests.get(url, params={"jobID": job_id}, timeout=60).json()
            if t_running is None and st["status"] != "enqueuing":
                t_running = time.monotonic()
            if st["status"] not in ("enqueuing", "running"):
                break
            time.sleep(0.2)
        t_end = time.monotonic()
    finally:
        stop_cluster(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)

    batches = st["batch_metrics"]["succeeded"]
    run_s = t_end - (t_running or t0)
    print(f"\nNo-op batch job: {args.items:,} items in batches of {args.batch_size} "
          f"({st['total_batch_count']:,} batches) on {args.workers} workers, {os.cpu_count()} cores\n")
    print("| status | submit -> running (enqueue) | running -> end | total | batches/s while running |")
    print("|---|---|---|---|---|")
    print(f"| {st['status']} ({batches:,} succeeded, {st['batch_metrics']['failed']} failed) "
          f"| {(t_running or t0) - t0:.1f} s | {run_s:.1f} s | {t_end - t0:.1f} s | {batches / run_s:,.0f} |")
    return 0 if st["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
