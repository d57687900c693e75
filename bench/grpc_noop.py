"""The gRPC no-op of ``bench/run grpc``: its proto and Handler (deployed as
a Cortex gRPC API by serval_driver.py), and, run as a script, the same
Handler in a bare grpcio Python server, the baseline of issue 25.

``python grpc_noop.py PORT THREADS``: compiles the proto with grpcio-tools
into a temporary directory, serves ``bench.Noop`` on 127.0.0.1:PORT with the
generated servicer glue (``add_NoopServicer_to_server``) in
``grpc.server(ThreadPoolExecutor(THREADS))``, as grpcio's documentation
sets a server up, prints ``ready`` and serves until killed.
"""

import os
import sys
import tempfile

NOOP_PROTO = """syntax = "proto3";
package bench;
service Noop {
    rpc Call (Empty) returns (Empty);
    rpc Stream (Empty) returns (stream Empty);
    rpc AsyncStream (Empty) returns (stream Empty);
}
message Empty {}
"""

NOOP_GRPC_HANDLER = """class Handler:
    def __init__(self, config, module_proto_pb2):
        self.empty = module_proto_pb2.Empty()

    def Call(self, payload):
        return self.empty

    def Stream(self, payload):
        for _ in range(100):
            yield self.empty

    async def AsyncStream(self, payload):
        for _ in range(100):
            yield self.empty
"""


def serve_bare(port: int, threads: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="grpc-bare-")
    with open(os.path.join(out, "noop.proto"), "w") as f:
        f.write(NOOP_PROTO)
    if protoc.main(["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}", "noop.proto"]) != 0:
        raise SystemExit("protoc failed on the no-op proto")
    sys.path.insert(0, out)
    import noop_pb2
    import noop_pb2_grpc

    scope = {}
    exec(NOOP_GRPC_HANDLER, scope)
    handler = scope["Handler"]({}, noop_pb2)

    class Servicer(noop_pb2_grpc.NoopServicer):
        """The Handler's methods, as grpcio calls a servicer's."""

        def Call(self, request, context):
            return handler.Call(request)

        def Stream(self, request, context):
            return handler.Stream(request)

        # AsyncStream stays UNIMPLEMENTED here: a grpcio sync server runs
        # no async generators (bench/run grpc measures it on Serval only).

    server = grpc.server(ThreadPoolExecutor(max_workers=threads))
    noop_pb2_grpc.add_NoopServicer_to_server(Servicer(), server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    serve_bare(int(sys.argv[1]), int(sys.argv[2]))
