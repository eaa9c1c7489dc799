"""A session's per-chunk path once its startup is over, compiled.

Owns: the protocol objects that take over a session's two transports when its startup ends
(Relay._relay_from_now_on): each chunk is written to the other leg, counted, checked for a
closing Terminate (client side) and fed to the session's decoder, all in native code (the
interpreted leg cost ~1,200 instructions of bytecode per chunk, the bare forwarder's one line a
tenth of that). Every other protocol callback (EOF, close, flow control) goes to the leg that
handled the startup (relay.py), where a session's logic lives.
Must not: do anything per chunk but forward, count, note a Terminate and decode; let a decoder
failure touch the byte stream (the session is desynced and keeps forwarding).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from pgscout.dataplane.decoder import Decoder

# Compiled, a Final is a C static: calling time.monotonic by its imported name was a look-up in
# the module's dict at every chunk.
_monotonic: Final = time.monotonic


class RelayingLeg:
    """One leg after startup. `leg` is its startup-phase protocol object, `peer` the transport
    the chunks go to, `relay` the session (relay.Relay), told when decoding fails."""

    def __init__(self, leg: Any, peer: Any, decoder: Decoder | None, relay: Any) -> None:
        self.leg = leg
        # The peer transport's bound write: calling it is one vectorcall, where `peer.write(...)`
        # looks the method up on the transport's type at every chunk.
        self.write: Callable[[bytes], object] = peer.write
        self.decoder = decoder
        self.relay = relay
        self.relayed = 0  # bytes forwarded since startup ended (see Relay.bytes_relayed)

    def eof_received(self) -> bool | None:
        return self.leg.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.leg.connection_lost(exc)

    def pause_writing(self) -> None:
        self.leg.pause_writing()

    def resume_writing(self) -> None:
        self.leg.resume_writing()

    def _desync(self, exc: Exception) -> None:
        # A FramingError (a length PostgreSQL itself rejects) desyncs like any decoder failure:
        # the bytes went through unchanged and the server answers them as it would directly.
        self.relay.desync(exc)


class RelayingClientLeg(RelayingLeg):
    """From the client: forward, count, note a Terminate, decode."""

    def __init__(self, leg: Any, peer: Any, decoder: Decoder | None, relay: Any) -> None:
        super().__init__(leg, peer, decoder, relay)
        self.said_goodbye: bool = relay.said_goodbye

    def data_received(self, data: bytes) -> None:
        self.write(data)
        end = len(data)
        self.relayed += end
        # Terminate ('X', Int32 4) is a client's last message: the hang-up policy must never
        # cancel what a client ended cleanly, and a TLS upstream leg can wait for the server's
        # close. Read in place (no slice); the relay's copy is written only when it changes.
        goodbye = (end >= 5 and data[end - 1] == 4 and data[end - 5] == 0x58
                   and data[end - 4] == 0 and data[end - 3] == 0 and data[end - 2] == 0)
        if goodbye != self.said_goodbye:
            self.said_goodbye = goodbye
            self.relay.said_goodbye = goodbye
        decoder = self.decoder
        if decoder is not None:
            try:
                decoder.client_data(data, _monotonic())
            except Exception as exc:
                self._desync(exc)


class RelayingServerLeg(RelayingLeg):
    """From the server: forward, count, decode."""

    def data_received(self, data: bytes) -> None:
        self.write(data)
        self.relayed += len(data)
        decoder = self.decoder
        if decoder is not None:
            try:
                decoder.server_data(data, _monotonic())
            except Exception as exc:
                self._desync(exc)
