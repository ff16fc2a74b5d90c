"""A bounded closed-loop HTTP load generator for the overload tests (its own process).

    python tests/load_client.py HOST PORT CONNECTIONS SECONDS BODIES.json [API_KEY]

Each connection sends POST /predict with the next body, waits for the whole answer and
sends again, until SECONDS have passed or a SIGTERM came (each connection finishes the
request it is on). Prints one JSON summary: answers by kind (real prediction, fallback,
503 with and without Retry-After, other), latency percentiles per kind in ms, and the
errors seen. Raw sockets on uvloop, so the client costs little next
to the server it loads.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any


def _request(host: str, body: bytes, key: str) -> bytes:
    auth = b"x-api-key: %s\r\n" % key.encode() if key else b""
    return (
        b"POST /predict HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
        b"%scontent-length: %d\r\n\r\n%s" % (host.encode(), auth, len(body), body)
    )


async def _connection(
    host: str, port: int, requests: list[bytes], until: list[float], out: dict[str, list[float]]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.monotonic() < until[0]:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            body = await reader.readexactly(int(headers["content-length"]))
            ms = (time.perf_counter() - t0) * 1000
            if status == 200:
                kind = "fallback" if b'"fallback":true' in body else "real"
            elif status == 503:
                kind = "503" if "retry-after" in headers else "503_no_retry_after"
            else:
                kind = f"status_{status}"
            out.setdefault(kind, []).append(ms)
            if headers.get("connection") == "close":
                break
    except (OSError, asyncio.IncompleteReadError) as e:
        out.setdefault(f"error_{type(e).__name__}", []).append(0.0)
    finally:
        writer.close()


def _summary(out: dict[str, list[float]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind, values in out.items():
        values.sort()
        n = len(values)
        summary[kind] = {
            "count": n,
            "p50_ms": values[n // 2],
            "p99_ms": values[min(n - 1, int(n * 0.99))],
            "max_ms": values[-1],
        }
    return summary


async def main(
    host: str, port: int, connections: int, seconds: float, bodies: list[Any], key: str
) -> None:
    requests = [_request(host, json.dumps(b).encode(), key) for b in bodies]
    out: dict[str, list[float]] = {}
    until = [time.monotonic() + seconds]  # SIGTERM: now
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, until.__setitem__, 0, 0.0)
    await asyncio.gather(
        *(
            _connection(host, port, requests[i:] + requests[:i], until, out)
            for i in range(connections)
        )
    )
    print(json.dumps(_summary(out)))


if __name__ == "__main__":
    import uvloop

    host, port, connections, seconds, path = sys.argv[1:6]
    key = sys.argv[6] if len(sys.argv) > 6 else ""
    with open(path) as f:
        bodies = json.load(f)
    uvloop.run(main(host, int(port), int(connections), float(seconds), bodies, key))
