"""Half-sent gRPC streams over raw HTTP/2, to measure what a server holds for them.

Opens `--connections` TLS connections (ALPN h2, with a client certificate), and on
each starts `--streams` calls whose request is never finished: HEADERS, then a DATA
frame announcing a large message and carrying only part of it, no END_STREAM. It
prints the server's advertised SETTINGS and, with `--pid`, the server's resident
memory before and after. Written with the standard library alone (HPACK literals
without Huffman coding), so no HTTP/2 package is needed.

    python -m tests.apps.halfopen --target 127.0.0.1:50051 --tls-dir pki/client --pid 1234
"""

from __future__ import annotations

import argparse
import socket
import ssl
import struct
import time
from pathlib import Path

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, GOAWAY = 0x0, 0x1, 0x4, 0x7
END_HEADERS = 0x4
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def headers(path: str, authority: str) -> bytes:
    fields = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    return b"".join(_literal(k, v) for k, v in fields)


def connect(target: str, tls_dir: Path, server_name: str) -> ssl.SSLSocket:
    """A TLS connection speaking h2, presenting the certificate in `tls_dir`."""
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    context.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
    context.set_alpn_protocols(["h2"])
    host, port = target.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    conn = context.wrap_socket(raw, server_hostname=server_name)
    conn.sendall(PREFACE + frame(SETTINGS, 0, 0, b""))
    return conn


def server_settings(conn: ssl.SSLSocket) -> dict[int, int]:
    """The first SETTINGS frame the server sends: {identifier: value}."""
    while True:
        head = _read(conn, 9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        payload = _read(conn, length)
        if kind == SETTINGS and not flags & 0x1:
            return {
                int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
                for i in range(0, len(payload), 6)
            }


def _read(conn: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def half_send(conn: ssl.SSLSocket, streams: int, path: str, authority: str, sent_bytes: int) -> None:
    """Starts `streams` calls whose message announces 4 MB and carries `sent_bytes`."""
    block = headers(path, authority)
    body = b"\x00" + struct.pack(">I", 4 * 1024 * 1024 - 1) + b"\x00" * sent_bytes
    for i in range(streams):
        stream = 2 * i + 1
        conn.sendall(frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, 0, stream, body))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--tls-dir", type=Path, required=True)
    p.add_argument("--server-name", default="wallet")
    p.add_argument("--path", default="/wallet.v1.Wallet/GetBalance")
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--sent-bytes", type=int, default=16_000)
    p.add_argument("--pid", type=int)
    p.add_argument("--hold-s", type=float, default=5.0)
    args = p.parse_args()
    before = rss_mb(args.pid) if args.pid else 0.0
    conns: list[ssl.SSLSocket] = []
    for _ in range(args.connections):
        conn = connect(args.target, args.tls_dir, args.server_name)
        if not conns:
            print("server settings:", server_settings(conn))
        try:
            half_send(conn, args.streams, args.path, args.server_name, args.sent_bytes)
        except OSError as e:
            print("send stopped:", e)
        conns.append(conn)
    time.sleep(args.hold_s)
    if args.pid:
        print(f"rss before {before:.0f} MB, after {rss_mb(args.pid):.0f} MB")
    for conn in conns:
        conn.close()


if __name__ == "__main__":
    main()
