#!/usr/bin/env python3
"""How long a shim takes to start: its `start` subcommand until it prints its
address, and until the shim behind that address answers a Connect; then Shutdown.

usage: shim_start.py SHIM BUNDLE ID    (BUNDLE holds config.json and the log FIFO)
prints: START_US READY_US
"""
import os
import socket
import struct
import subprocess
import sys
import time


def field(num, data):
    """A protobuf length-delimited field."""
    return bytes([num << 3 | 2]) + varint(len(data)) + data


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def call(sock, stream, method, payload):
    """One ttrpc request on containerd.task.v2.Task; waits for its response."""
    req = field(1, b"containerd.task.v2.Task") + field(2, method.encode()) + field(3, payload)
    sock.sendall(struct.pack(">IIBB", len(req), stream, 1, 0) + req)
    head = b""
    while len(head) < 10:
        chunk = sock.recv(10 - len(head))
        if not chunk:
            return False
        head += chunk
    length = struct.unpack(">I", head[:4])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return False
        body += chunk
    return True


def main():
    shim, bundle, task = sys.argv[1:4]
    args = [shim, "-namespace", "bench", "-address", os.path.join(bundle, "none.sock"), "-id", task]
    t0 = time.perf_counter()
    out = subprocess.run(args + ["start"], cwd=bundle, stdin=subprocess.DEVNULL,
                         capture_output=True, check=True).stdout.decode().strip()
    t1 = time.perf_counter()
    path = out.removeprefix("unix://")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    ok = call(sock, 1, "Connect", field(1, task.encode()))
    t2 = time.perf_counter()
    call(sock, 3, "Shutdown", field(1, task.encode()))
    sock.close()
    if not ok:
        sys.exit("no answer to Connect")
    print(int((t1 - t0) * 1e6), int((t2 - t0) * 1e6))


main()
