"""A real gRPC server (grpcio) for the end-to-end tests, with no generated code: methods
take and return raw bytes.

  Say    unary             returns b"hello " + request, trailing metadata x-served-by
  Count  server streaming  request is a decimal n; streams b"0" .. b"n-1"
  Chat   bidi streaming    echoes every message
  Fail   unary             aborts with NOT_FOUND and a message

Usage: echo_server.py --ready-file PATH [--cert CRT --key KEY]
"""
import argparse
import time
from concurrent import futures

import grpc

SERVICE = "portcullis.test.Echo"


def say(request, context):
    context.set_trailing_metadata((("x-served-by", "python-grpc"),))
    return b"hello " + request


def count(request, context):
    for i in range(int(request.decode())):
        yield str(i).encode()


def chat(requests, context):
    for message in requests:
        yield message


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    if args.cert:
        with open(args.cert, "rb") as c, open(args.key, "rb") as k:
            creds = grpc.ssl_server_credentials(((k.read(), c.read()),))
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(args.ready_file + ".tmp", "w") as f:
        f.write(f"127.0.0.1:{port}")
    import os

    os.rename(args.ready_file + ".tmp", args.ready_file)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
