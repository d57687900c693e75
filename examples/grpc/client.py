"""Calls the `sample` gRPC API of examples/grpc through a running cluster's
proxy (it deploys nothing). Stubs are generated from handler.proto with
grpcio-tools, as any gRPC client would:

    python examples/grpc/client.py [HOST:PORT]     (default 127.0.0.1:8000)
"""

import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))


def stubs():
    """handler_pb2, handler_pb2_grpc, generated into a temporary folder."""
    out = tempfile.mkdtemp(prefix="sample-stubs-")
    if protoc.main(["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}", "handler.proto"]):
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    import handler_pb2
    import handler_pb2_grpc

    return handler_pb2, handler_pb2_grpc


def main():
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8000"
    handler_pb2, handler_pb2_grpc = stubs()
    with grpc.insecure_channel(address) as channel:
        stub = handler_pb2_grpc.HandlerStub(channel)
        print("Predict:", stub.Predict(handler_pb2.Sample(a="text"), timeout=10).b)
        samples = (handler_pb2.Sample(a=word) for word in ["a", "b", "c", "d"])
        print("Collect:", stub.Collect(samples, timeout=10).b)
        print("Spell:  ", [r.b for r in stub.Spell(handler_pb2.Sample(a="grpc"), timeout=10)])
        samples = (handler_pb2.Sample(a=word) for word in ["ping", "pong"])
        print("Echo:   ", [r.b for r in stub.Echo(samples, timeout=10)])
        try:
            stub.Predict(handler_pb2.Sample(a=""), timeout=10)
        except grpc.RpcError as e:
            print("Predict(empty):", e.code().name, e.details())


if __name__ == "__main__":
    main()
