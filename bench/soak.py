"""Soak: a head under mixed valid and hostile traffic for a while, with no
metrics scraper, printing the resident memory (RSS) and open file
descriptors of every Serval process each minute. They must stay flat after
the warm-up (issues 18 and 19).

    bench/run soak [--minutes 10]          # release build (bench/.venv)
    .venv/bin/python bench/soak.py --minutes 1   # the debug build, quickly

Traffic, each stream bounded in rate and (by the duration) in count:
- valid: GETs of a Python no-op (wrk when installed, else client threads),
  POSTs of a JSON echo, handle calls from this process;
- hostile: slow-header connections that trickle one header line every few
  seconds (a bounded pool, reopened when the proxy closes them), garbage
  bytes to the HTTP port, bodies declared far over the limit, gRPC calls to
  made-up services (metric label flood), unknown paths, connect-and-close
  churn, frames sent to a replica's TCP port without the handshake, and
  control calls with a wrong token.

Prints a table a minute, then a summary (also as Markdown, for
BENCHMARKS.md) comparing the peaks of the first and second halves of the
rows after the warm-up. Exits 1 when a process grew by more than the
tolerance (RSS: 10 % and 8 MB; descriptors: 32), else 0. Every process it
started is stopped.
"""

import argparse
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Noop:
    def __call__(self, request):
        return "ok"


class Echo:
    async def __call__(self, request):
        return await request.json()


# ------------------------------------------------------------------ processes

def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cluster_processes(serve, data_dir):
    """{label: pid} of the head and every running replica."""
    out = {}
    with open(os.path.join(data_dir, "cluster.json")) as f:
        out["head"] = json.load(f)["pid"]
    for r in serve.status().get("replicas", []):
        if r.get("state") == "running" and r.get("pid"):
            out[f"replica {r['backend']}/{r['id']}"] = r["pid"]
    return out


# ------------------------------------------------------------------- traffic

class Streams:
    """Background traffic threads; each counts what it sent and stops when
    ``stop`` is set."""

    def __init__(self, http_port, control_addr):
        self.http = ("127.0.0.1", http_port)
        self.control_addr = control_addr
        self.stop = threading.Event()
        self.counts = {}
        self.lock = threading.Lock()
        self.threads = []
        self.replica_tcp = []

    def count(self, name, n=1):
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def every(self, name, period, fn):
        def loop():
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    fn()
                    self.count(name)
                except OSError:
                    self.count(name + " (error)")
                self.stop.wait(max(0.0, period - (time.monotonic() - t0)))
        t = threading.Thread(target=loop, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def request(self, raw, read=True):
        with socket.create_connection(self.http, timeout=10) as s:
            s.sendall(raw)
            if read:
                s.settimeout(10)
                try:
                    s.recv(65536)
                except socket.timeout:
                    pass

    # valid
    def get_loop(self):
        import http.client
        conn = http.client.HTTPConnection(*self.http, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/noop")
                r = conn.getresponse()
                r.read()
                self.count("GET /noop" if r.status == 200 else f"GET /noop {r.status}")
            except (OSError, http.client.HTTPException):
                self.count("GET /noop (error)")
                conn.close()
                conn = http.client.HTTPConnection(*self.http, timeout=10)
                self.stop.wait(0.1)

    def post_echo(self):
        body = json.dumps({"x": random.random(), "pad": "y" * 2000}).encode()
        req = urllib.request.Request(f"http://{self.http[0]}:{self.http[1]}/echo", data=body,
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    # hostile
    def slow_headers(self, n):
        """Keeps ``n`` connections open that send a header line every 5 s;
        reopens each one the proxy closes (counted)."""
        def one():
            while not self.stop.is_set():
                try:
                    s = socket.create_connection(self.http, timeout=10)
                    s.sendall(b"GET /noop HTTP/1.1\r\nHost: soak\r\n")
                    i = 0
                    while not self.stop.is_set():
                        self.stop.wait(5)
                        s.sendall(f"X-Slow-{i}: {'a' * 10}\r\n".encode())
                        i += 1
                except OSError:
                    self.count("slow headers closed by the proxy")
                finally:
                    try:
                        s.close()
                    except Exception:
                        pass
                self.stop.wait(1)
        for i in range(n):
            t = threading.Thread(target=one, name=f"slow-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def garbage(self):
        self.request(os.urandom(random.randint(1, 2048)))

    def oversize(self):
        head = (b"POST /echo HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10000000000\r\n\r\n")
        self.request(head + b"x" * 65536)

    def grpc_flood(self):
        n = random.randint(0, 10**9)
        path = f"/made.up.Service{n}/Method{n}"
        self.request(f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/grpc\r\n"
                     f"Content-Length: 5\r\n\r\n".encode() + b"\0\0\0\0\0")

    def unknown_path(self):
        self.request(f"GET /nothing/{random.randint(0, 10**9)} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())

    def churn(self):
        socket.create_connection(self.http, timeout=10).close()

    def frame_without_handshake(self):
        if not self.replica_tcp:
            return
        host, port = random.choice(self.replica_tcp).rsplit(":", 1)
        body = os.urandom(64)
        frame = struct.pack(">IQ", 8 + len(body), 1) + body
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.settimeout(10)
            try:
                s.recv(64)  # the replica's challenge
                s.sendall(frame.ljust(70, b"\0"))
                s.recv(64)  # nothing: closed
            except OSError:
                pass

    def wrong_token(self):
        from serval import _native
        try:
            _native.Client(self.control_addr, "not-the-cluster-token-0000")
        except Exception:
            pass


def wrk_available():
    return shutil.which("wrk") is not None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-minutes", type=float, default=1.0,
                    help="minutes before the baseline row (default 1)")
    ap.add_argument("--slow-connections", type=int, default=200)
    ap.add_argument("--markdown", help="also write the summary table here")
    args = ap.parse_args()

    from serval import serve

    data_dir = tempfile.mkdtemp(prefix="serval-soak-")
    http_port, control_port = free_port(), free_port()
    os.environ["SERVAL_CONTROL_PORT"] = str(control_port)
    os.environ.setdefault("SERVAL_PYTHON", sys.executable)
    serve.start(http_options={"port": http_port}, data_dir=data_dir)
    streams = None
    wrk = None
    try:
        serve.create_backend("noop", Noop, config={"num_replicas": 1})
        serve.create_endpoint("noop", backend="noop", route="/noop")
        serve.create_backend("echo", Echo)
        serve.create_endpoint("echo", backend="echo", route="/echo", methods=["POST"])
        handle = serve.get_handle("noop")
        handle.remote().result(timeout=60)

        streams = Streams(http_port, f"127.0.0.1:{control_port}")
        streams.replica_tcp = [r["tcp_addr"] for r in serve.status().get("replicas", [])
                               if r.get("tcp_addr")]
        total_s = args.minutes * 60
        if wrk_available():
            wrk = subprocess.Popen(["wrk", "-t1", "-c8", f"-d{int(total_s) + 5}s",
                                    f"http://127.0.0.1:{http_port}/noop"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        else:
            for i in range(4):
                t = threading.Thread(target=streams.get_loop, name=f"get-{i}", daemon=True)
                t.start()
                streams.threads.append(t)
        streams.every("POST /echo", 0.02, streams.post_echo)
        streams.every("handle call", 0.01, lambda: handle.remote().result(timeout=30))
        streams.slow_headers(args.slow_connections)
        streams.every("garbage", 0.05, streams.garbage)
        streams.every("oversize body", 0.5, streams.oversize)
        streams.every("gRPC made-up service", 0.05, streams.grpc_flood)
        streams.every("unknown path", 0.02, streams.unknown_path)
        streams.every("connect-close", 0.02, streams.churn)
        streams.every("frame without handshake", 0.1, streams.frame_without_handshake)
        streams.every("wrong token", 1.0, streams.wrong_token)

        rows = []  # (minute, {label: (rss_kb, fds)})
        start = time.monotonic()
        minute = 0
        print(f"soak: {args.minutes:g} min, wrk={'yes' if wrk else 'no'}, no scraper", flush=True)
        while True:
            minute += 1
            target = start + minute * 60
            end = start + total_s
            time.sleep(max(0.0, min(target, end) - time.monotonic()))
            procs = cluster_processes(serve, data_dir)
            sample = {label: (rss_kb(pid), fd_count(pid)) for label, pid in procs.items()}
            rows.append((round((time.monotonic() - start) / 60, 1), sample))
            cells = "  ".join(f"{label}: {r / 1024 if r else 0:.1f} MB {f} fds" for label, (r, f) in sample.items())
            print(f"[{rows[-1][0]:>5} min] {cells}", flush=True)
            if time.monotonic() >= end - 0.5:
                break
        streams.stop.set()
        wrk_out = ""
        if wrk:
            wrk_out, _ = wrk.communicate(timeout=60)
    finally:
        if streams:
            streams.stop.set()
        if wrk and wrk.poll() is None:
            wrk.kill()
        try:
            serve.shutdown()
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)

    # Summary: after the warm-up, the first half of the rows against the
    # second, by their peaks. Slow-header connections are cut by the
    # proxy's header timeout and reopened, so a process's open files swing
    # with where each sample falls in that cycle: peaks show a trend, single
    # samples do not.
    after = [s for m, s in rows if m >= args.warmup_minutes] or [rows[-1][1]]
    half = max(1, len(after) // 2)
    first, second = after[:half], after[half:] or after[-1:]

    def peak(samples, label, i):
        values = [s[label][i] for s in samples if label in s and s[label][i] is not None]
        return max(values) if values else None

    failed = False
    lines = ["| process | RSS, first half (peak) | RSS, second half (peak) | change | fds, first half (peak) "
             "| fds, second half (peak) |",
             "|---|---|---|---|---|---|"]
    for label in rows[-1][1]:
        r0, r1 = peak(first, label, 0), peak(second, label, 0)
        f0, f1 = peak(first, label, 1), peak(second, label, 1)
        if r0 is None or r1 is None:
            lines.append(f"| {label} | n/a | n/a | | {f0} | {f1} |")
            continue
        grown_mb = (r1 - r0) / 1024
        pct = 100.0 * (r1 - r0) / r0
        if grown_mb > 8 and pct > 10:
            failed = True
        if f0 is not None and f1 is not None and f1 - f0 > 32:
            failed = True
        lines.append(f"| {label} | {r0 / 1024:.1f} MB | {r1 / 1024:.1f} MB | {grown_mb:+.1f} MB ({pct:+.1f} %) "
                     f"| {f0} | {f1} |")
    print("\nper minute (RSS MB / fds):")
    for m, s in rows:
        print(f"  {m:>5}: " + ", ".join(f"{k} {v[0] / 1024 if v[0] else 0:.1f}/{v[1]}" for k, v in s.items()))
    print("\nsent:")
    for name, n in sorted(streams.counts.items()):
        print(f"  {name}: {n}")
    if wrk_out:
        print("\nwrk:\n" + wrk_out)
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    print("\nverdict:", "GREW" if failed else "flat after warm-up")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
