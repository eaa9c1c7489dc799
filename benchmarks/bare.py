"""The floor for any asyncio proxy: a uvloop forwarder that only copies bytes.

    python benchmarks/bare.py --listen HOST:PORT --upstream HOST:PORT

Each accepted client gets its own upstream connection; every chunk read on one leg is written
to the other, with the same write-buffer flow control pgscout uses (a leg whose write buffer
passes the high-water mark stops the other leg's reading until it drains below the low-water
mark). Whatever pgscout costs beyond this is pgscout's own work, not asyncio's or uvloop's.

Owns: the two Protocols of a forwarded connection and the listener.
Must not: look at the bytes (no startup parsing, no SSLRequest answer: the benchmark's clients
use sslmode=disable, so libpq's first bytes are the StartupMessage, and anything else would pass
through to the server untouched), log per connection, or import anything beyond the standard
library and uvloop (its cost is the measurement).
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop

# pgscout's defaults (proxy.write_buffer_high_bytes / proxy.write_buffer_low_bytes).
WRITE_BUFFER_HIGH_BYTES = 256 * 1024
WRITE_BUFFER_LOW_BYTES = 64 * 1024
# As pgscout's listener: connection churn must not overflow the accept queue.
LISTEN_BACKLOG = 1024


class Leg(asyncio.Protocol):
    """One side of a forwarded connection; `peer` is the other side."""

    __slots__ = ("transport", "peer")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Leg | UpstreamPending | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH_BYTES, WRITE_BUFFER_LOW_BYTES)

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        return False  # the protocol has no half-close: closing the transport ends both legs

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


class UpstreamPending:
    """Stands in for the upstream leg while it connects, keeping what the client sends meanwhile
    (its StartupMessage), so that forwarding needs no check per chunk."""

    __slots__ = ("transport", "chunks")

    def __init__(self) -> None:
        self.transport = self
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def close(self) -> None:
        self.chunks.clear()


class ClientLeg(Leg):
    """The client's side, accepted before its upstream connection exists."""

    __slots__ = ("upstream_host", "upstream_port", "connecting")

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__()
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.connecting: asyncio.Task | None = None  # held: the loop keeps only a weak reference

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.peer = UpstreamPending()
        self.connecting = asyncio.get_running_loop().create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream_transport, upstream = await loop.create_connection(
                Leg, self.upstream_host, self.upstream_port)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client hung up while we were connecting
            upstream_transport.close()
            return
        upstream_transport.writelines(self.peer.chunks)
        upstream.peer, self.peer = self, upstream

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()


async def serve(listen_host: str, listen_port: int, upstream_host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientLeg(upstream_host, upstream_port),
                                      listen_host, listen_port, reuse_address=True,
                                      backlog=LISTEN_BACKLOG)
    # The harness stops this process with SIGTERM; its default action ends it, and nothing here
    # needs flushing first.
    await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bare uvloop byte forwarder (benchmark floor)")
    parser.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--upstream", type=_address, required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    uvloop.run(serve(*args.listen, *args.upstream))


if __name__ == "__main__":
    main()
