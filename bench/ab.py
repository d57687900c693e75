"""Two builds of Serval, A and B, on the same HTTP no-op in the same run:
what a change costs per request (issue 19 asked it of the data plane's
authentication: within 5 %).

    bench/ab.py --python OLD/bin/python --python NEW/bin/python [--rounds 3] [--duration 10]

Each ``--python`` is an interpreter whose ``serval`` is one build (a
release wheel: ``maturin build --release`` of each revision, installed in a
venv of its own). Rounds alternate A and B; each starts a fresh head with
that build, deploys a sync Python no-op at ``max_concurrent_queries`` 8 (the
Ray Serve 1.x default) and 100, runs wrk at c=64 on each and stops the head.
Prints requests/s and p99 per build and limit, the median over the rounds,
and B against A; and the CPU time the cluster's processes (the driver,
the head, its replicas: not wrk) spent per request, which on a small
machine shared with wrk varies much less from round to round than
requests/s does. wrk must be installed (bench/run installs it).
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile

CHILD = r'''
import json, os, sys
from serval import serve

class Noop:
    def __call__(self, request):
        return "ok"

serve.start(http_options={"port": int(os.environ["AB_HTTP_PORT"])}, data_dir=os.environ["AB_DATA_DIR"])
for limit in (8, 100):
    serve.create_backend(f"noop{limit}", Noop, config={"max_concurrent_queries": limit})
    serve.create_endpoint(f"noop{limit}", backend=f"noop{limit}", route=f"/noop{limit}")
    serve.get_handle(f"noop{limit}").remote().result(timeout=120)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.read()
serve.shutdown()
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrk(url, duration, connections=64):
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, float(p99.group(1)) * scale, int(errors.group(1)) if errors else 0


def cpu_seconds(marker):
    """User + system CPU seconds of every process whose environment holds
    ``marker`` (``AB_DATA_DIR=...`` of one round: the driver, the head it
    starts, which detaches, and the head's replicas; not wrk). A process
    that ended meanwhile is skipped."""
    total, needle = 0, marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measured(marker, url, duration):
    """wrk on ``url``, plus the cluster's CPU microseconds per request."""
    before = cpu_seconds(marker)
    rps, p99, errors = wrk(url, duration)
    spent = cpu_seconds(marker) - before
    return rps, p99, errors, 1e6 * spent / max(1.0, rps * duration)


def one_round(python, duration):
    data_dir = tempfile.mkdtemp(prefix="serval-ab-")
    http_port = free_port()
    env = dict(os.environ, AB_HTTP_PORT=str(http_port), AB_DATA_DIR=data_dir,
               SERVAL_CONTROL_PORT=str(free_port()), SERVAL_PYTHON=python)
    child = subprocess.Popen([python, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        line = child.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"{python}: the cluster did not start")
        wrk(f"http://127.0.0.1:{http_port}/noop8", 2)  # warm-up
        return {limit: measured(f"AB_DATA_DIR={data_dir}", f"http://127.0.0.1:{http_port}/noop{limit}", duration)
                for limit in (8, 100)}
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", action="append", required=True, help="A's then B's interpreter")
    ap.add_argument("--label", action="append", help="names of A and B (default: A, B)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    args = ap.parse_args()
    if len(args.python) != 2:
        ap.error("give --python twice: A, then B")
    labels = args.label or ["A", "B"]
    results = {label: {8: [], 100: []} for label in labels}
    for r in range(args.rounds):
        order = list(zip(labels, args.python))
        if r % 2:
            order.reverse()  # alternate who goes first
        for label, python in order:
            out = one_round(python, args.duration)
            for limit, value in out.items():
                results[label][limit].append(value)
            print(f"round {r + 1} {label}: " + ", ".join(
                f"limit {k}: {v[0]:.0f} req/s p99 {v[1]:.2f} ms {v[3]:.1f} CPU us/req"
                + (f" ({v[2]} non-2xx)" if v[2] else "")
                for k, v in out.items()), flush=True)
    print("\n| build | limit 8, c=64 | limit 100, c=64 |\n|---|---|---|")
    medians, cpu = {}, {}
    for label in labels:
        cells = []
        for limit in (8, 100):
            rps = statistics.median(v[0] for v in results[label][limit])
            p99 = statistics.median(v[1] for v in results[label][limit])
            us = statistics.median(v[3] for v in results[label][limit])
            medians[(label, limit)], cpu[(label, limit)] = rps, us
            cells.append(f"{rps / 1000:.1f}k req/s, p99 {p99:.2f} ms, {us:.1f} CPU us/req")
        print(f"| {label} | " + " | ".join(cells) + " |")
    a, b = labels
    print(f"| {b} / {a} | " + " | ".join(
        f"{100.0 * (medians[(b, limit)] / medians[(a, limit)] - 1):+.1f} % req/s, "
        f"{100.0 * (cpu[(b, limit)] / cpu[(a, limit)] - 1):+.1f} % CPU/req" for limit in (8, 100)) + " |")


if __name__ == "__main__":
    sys.exit(main())
