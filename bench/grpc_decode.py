"""Where a gRPC request message is best decoded (issue 25): in the replica's
Python thread with the generated class (``FromString``, protobuf's C
``upb`` parser), or in Rust with the descriptor set.

A Handler takes a ``*_pb2`` message either way. A message decoded in Rust
still has to become that Python object, and the cheapest way to build one
from values decoded elsewhere is the class's constructor with those values
(``Cls(**fields)``); the Rust decode and the conversion of its values to
Python objects come on top. So this times both ends in one process, for a
few shapes of message: when the constructor alone is no faster than
``FromString``, decoding in Rust cannot win, and Python decodes.

    bench/.venv/bin/python bench/grpc_decode.py
"""

import timeit

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import api_implementation

F = descriptor_pb2.FieldDescriptorProto


def message_classes():
    """The shapes, built from a descriptor (no protoc): empty, three
    scalars, 1 KB of bytes, 1,000 floats, a nested list of 20 items."""
    file = descriptor_pb2.FileDescriptorProto(name="decode_bench.proto", package="decodebench", syntax="proto3")

    def message(name, *fields):
        m = file.message_type.add(name=name)
        for number, (field, kind, label, type_name) in enumerate(fields, 1):
            m.field.add(name=field, number=number, type=kind, label=label, type_name=type_name)

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("Empty")
    message("Scalars", ("id", F.TYPE_INT64, one, None), ("name", F.TYPE_STRING, one, None),
            ("score", F.TYPE_DOUBLE, one, None))
    message("Blob", ("data", F.TYPE_BYTES, one, None))
    message("Tensor", ("values", F.TYPE_FLOAT, many, None))
    message("Item", ("key", F.TYPE_STRING, one, None), ("value", F.TYPE_INT64, one, None))
    message("Items", ("items", F.TYPE_MESSAGE, many, ".decodebench.Item"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"decodebench.{name}"))
            for name in ("Empty", "Scalars", "Blob", "Tensor", "Items", "Item")}


def cases(classes):
    item = classes["Item"]
    return [
        ("empty", classes["Empty"], {}),
        ("3 scalars", classes["Scalars"], {"id": 42, "name": "a name", "score": 0.5}),
        ("1 KB bytes", classes["Blob"], {"data": b"x" * 1024}),
        ("1,000 floats", classes["Tensor"], {"values": [0.25] * 1000}),
        ("20 nested", classes["Items"], {"items": [item(key=f"k{i}", value=i) for i in range(20)]}),
    ]


def per_call_us(fn, number):
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main():
    print(f"protobuf implementation: {api_implementation.Type()}")
    print("| message | FromString (Python decodes) µs | constructor from decoded values µs | constructor / FromString |")
    print("|---|---|---|---|")
    for label, cls, fields in cases(message_classes()):
        data = cls(**fields).SerializeToString()
        parse = per_call_us(lambda: cls.FromString(data), 20000)
        build = per_call_us(lambda: cls(**fields), 20000)
        print(f"| {label} ({len(data)} B) | {parse:.2f} | {build:.2f} | {build / parse:.2f}× |")


if __name__ == "__main__":
    main()
