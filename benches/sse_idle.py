#!/usr/bin/env python3
"""Broker memory per idle SSE stream and per held long poll (docs/http.md).

    python3 benches/sse_idle.py --port 8080 --pid "$(pidof ternmq)" --clients 1000

Opens N SSE streams (GET /sse, a clean session each), then N long polls (GET /poll with
a client id each, held), and reads the broker's VmRSS before and after each step. Only
127.0.0.1; every wait is bounded; the connections close when it exits.
"""
import argparse
import asyncio
import sys


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_request(port, path):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def sse(port, i):
    reader, writer = await open_request(port, f"/sse?topic=idle/{i}")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace").splitlines()[0])
    return reader, writer


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=1000)
    a = ap.parse_args()
    before = rss_kib(a.pid)
    streams = []
    for start in range(0, a.clients, 100):
        streams += await asyncio.gather(*(sse(a.port, i) for i in range(start, min(a.clients, start + 100))))
    await asyncio.sleep(0.5)
    after_sse = rss_kib(a.pid)
    polls = []
    for start in range(0, a.clients, 100):
        polls += await asyncio.gather(*(
            open_request(a.port, f"/poll?topic=idle/p{i}&client_id=idle-poll-{i}&timeout=60")
            for i in range(start, min(a.clients, start + 100))))
    await asyncio.sleep(1.0)
    after_poll = rss_kib(a.pid)
    n = a.clients
    print(f"broker RSS {before} KiB; +{n} SSE streams {after_sse} KiB "
          f"({(after_sse - before) * 1024 // n} B each); +{n} held polls {after_poll} KiB "
          f"({(after_poll - after_sse) * 1024 // n} B each)")
    for _, w in streams + polls:
        w.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # a setup problem: say what, exit 2
        print(f"sse_idle: {e}", file=sys.stderr)
        sys.exit(2)
