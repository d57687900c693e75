"""A Cortex gRPC Handler: one method per RPC of handler.proto's service.

Each method takes `payload` (the request, or an iterator of requests for a
`stream` input) and/or `context` (grpcio's ServicerContext), by name.
"""

import grpc


class Handler:
    def __init__(self, config, module_proto_pb2):
        # module_proto_pb2: handler.proto compiled at `serve deploy`.
        self.pb = module_proto_pb2
        self.prefix = config.get("prefix", "")

    def Predict(self, payload, context):
        if not payload.a:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a is empty")
        return self.pb.Response(b=self.prefix + payload.a.upper())

    def Collect(self, payload):
        return self.pb.Response(b=" ".join(sample.a for sample in payload))

    def Spell(self, payload):
        # Each response reaches the client as it is yielded.
        for letter in payload.a:
            yield self.pb.Response(b=letter)

    def Echo(self, payload):
        for sample in payload:
            yield self.pb.Response(b=sample.a)
