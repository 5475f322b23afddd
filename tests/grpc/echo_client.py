"""A real gRPC client (grpcio) that calls the echo service through the relay with a device
certificate, and prints what it saw as one JSON object.

Usage: echo_client.py ADDR AUTHORITY CA CERT KEY
"""
import json
import sys

import grpc

SERVICE = "/portcullis.test.Echo/"


def main():
    addr, authority, ca, cert, key = sys.argv[1:6]
    with open(ca, "rb") as f:
        root = f.read()
    with open(cert, "rb") as f:
        chain = f.read()
    with open(key, "rb") as f:
        private = f.read()
    creds = grpc.ssl_channel_credentials(root, private, chain)
    options = (
        ("grpc.ssl_target_name_override", authority),
        ("grpc.default_authority", authority),
    )
    out = {}
    with grpc.secure_channel(addr, creds, options=options) as channel:
        say = channel.unary_unary(SERVICE + "Say")
        reply, call = say.with_call(b"alice", timeout=10)
        out["say"] = reply.decode()
        out["say_trailers"] = dict(call.trailing_metadata())
        count = channel.unary_stream(SERVICE + "Count")
        out["count"] = [m.decode() for m in count(b"5", timeout=10)]
        chat = channel.stream_stream(SERVICE + "Chat")
        out["chat"] = [m.decode() for m in chat(iter([b"a", b"b", b"c"]), timeout=10)]
        try:
            channel.unary_unary(SERVICE + "Fail")(b"", timeout=10)
            out["fail"] = "no error"
        except grpc.RpcError as e:
            out["fail"] = [e.code().name, e.details()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
