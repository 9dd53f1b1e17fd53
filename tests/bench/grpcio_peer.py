#!/usr/bin/env python3
"""transfer_bench's Python peer: the same bytes through Python grpcio (Debian's python3-grpcio, the
transport Flower is built on), over mutual TLS with the bench's certificates, in the same chunks.

  grpcio_peer.py serve  --certs DIR --port-file FILE --spool FILE
      A server whose one method takes a stream of chunks, spools them to FILE (as fedlora's
      coordinator spools an upload) and answers one byte once the stream ends.
  grpcio_peer.py upload --certs DIR --port PORT --data FILE --chunk BYTES --runs N
      Streams FILE's bytes in chunks of BYTES, N times after an untimed warm-up call on the same
      channel; prints one JSON line: {"mb_per_s": [...], "cpu_s": client CPU seconds per run}.

No generated code: the method takes and returns raw bytes (grpcio's generic handlers).
"""
import argparse
import json
import os
import pathlib
import sys
import time
from concurrent import futures

import grpc

METHOD = "/fedlora.bench.Transfer/Upload"
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def read(certs, name):
    return (pathlib.Path(certs) / name).read_bytes()


def serve(args):
    spool = args.spool

    def upload(chunks, context):
        with open(spool, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
        return b"k"

    handler = grpc.method_handlers_generic_handler(
        "fedlora.bench.Transfer", {"Upload": grpc.stream_unary_rpc_method_handler(upload)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(read(args.certs, "server.key"), read(args.certs, "server.pem"))],
        root_certificates=read(args.certs, "ca.pem"), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    tmp = args.port_file + ".tmp"
    pathlib.Path(tmp).write_text(f"{port}\n")
    os.replace(tmp, args.port_file)
    server.wait_for_termination()


def upload(args):
    data = pathlib.Path(args.data).read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.certs, "ca.pem"), private_key=read(args.certs, "client-1.key"),
        certificate_chain=read(args.certs, "client-1.pem"))
    channel = grpc.secure_channel(f"localhost:{args.port}", credentials, options=OPTIONS)
    call = channel.stream_unary(METHOD)
    chunk = args.chunk

    def chunks(payload):
        view = memoryview(payload)
        for at in range(0, len(payload), chunk):
            yield bytes(view[at:at + chunk])

    if call(chunks(b"warm-up")) != b"k":
        sys.exit("the warm-up call failed")
    rates, cpu = [], 0.0
    for _ in range(args.runs):
        cpu0, start = time.process_time(), time.perf_counter()
        if call(chunks(data)) != b"k":
            sys.exit("an upload failed")
        seconds = time.perf_counter() - start
        cpu += time.process_time() - cpu0
        rates.append(len(data) / 1e6 / seconds)
    print(json.dumps({"mb_per_s": rates, "cpu_s": cpu / args.runs}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--certs", required=True)
    s.add_argument("--port-file", required=True)
    s.add_argument("--spool", required=True)
    u = sub.add_parser("upload")
    u.add_argument("--certs", required=True)
    u.add_argument("--port", required=True)
    u.add_argument("--data", required=True)
    u.add_argument("--chunk", type=int, default=4 << 20)
    u.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    serve(args) if args.command == "serve" else upload(args)


if __name__ == "__main__":
    main()
