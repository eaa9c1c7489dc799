"""The data plane's end of the channel to the analysis process: records out, requests answered.

Owns: starting the analysis process (`python -m pgscout.worker`, with two socketpairs) and
starting it again when it dies; the batch of records (`put` is `list.append`, so a statement
costs the forwarding loop one C call here), written every FLUSH_SECONDS as one frame on the
records channel; shedding statement records, counted, while that channel's write buffer is over
its byte bound (the analysis process is behind), so that forwarding never waits for analysis and
memory stays bounded; telling it every records.ACTIVE_SECONDS which sessions have a request
outstanding (a statement is recorded only when it completes); relaying admin requests, with the
data plane's snapshot, on the control channel, which no backlog of records can hold up (a
request names the records sent before it, and is answered once those are analysed, or after
records.REQUEST_CATCH_UP_SECONDS with what is); and
writing the analysis process's log lines (findings, slow statements: few, rate-limited) into
the data plane's one log.
Session records (opened, ready, closed...) are never shed: they are few and keep the analysis
process's session table right; a restarted analysis process is told every open session first
(what was sent to the one that died is gone with it).
Must not: block, wait on the analysis process anywhere but in `request`, or look into records.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

from pgscout.dataplane.records import (ACTIVE, ACTIVE_SECONDS, LOG, REPLY, REQUEST, SETTINGS,
                                       STARTED, STATEMENT, FrameReader, decode_payload,
                                       pickled_frame, records_frame)

log = structlog.get_logger("pgscout.handoff")
analysis_log = structlog.get_logger("pgscout.analysis")

FLUSH_SECONDS = 0.01
_RESTART_DELAY_SECONDS = 1.0
_STOP_TIMEOUT_SECONDS = 5.0
_START_TIMEOUT_SECONDS = 60.0


class AnalysisUnavailable(Exception):
    """The analysis process is not running or did not answer in time."""


class AnalysisLink:
    def __init__(self, settings: Any, backlog_bytes: int) -> None:
        self.settings = settings
        self._backlog_bytes = backlog_bytes
        self._batch: list[tuple] = []
        self.put = self._batch.append  # the hot path: records are appended, nothing else
        self._transport: asyncio.Transport | None = None  # records channel
        self._control: asyncio.Transport | None = None
        self._channel_records = 0  # records written to this analysis process
        self._process: asyncio.subprocess.Process | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        self._supervisor: asyncio.Task | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self.records_sent = 0
        self.records_shed = 0
        self.restarts = 0
        # The open sessions as records (Server.session_records), told to a restarted process.
        self.session_records: Callable[[], list[tuple]] | None = None
        # The sessions with a request outstanding (Server.active_sessions), told once a second.
        self.active_sessions: Callable[[], tuple[int, ...]] | None = None
        self._active_told_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        self._schedule_flush()

    async def stop(self) -> None:
        """Send what is batched, close the channel (the analysis process flushes and exits)."""
        self._stopping = True
        if self._flusher is not None:
            self._flusher.cancel()
        self.flush()
        for transport in (self._transport, self._control):
            if transport is not None:
                transport.close()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()

    def reconfigure(self, settings: Any) -> None:
        """New settings apply to the records made after them: they travel in the records' order."""
        self.settings = settings
        self.flush()
        if self._transport is not None:
            self._transport.write(pickled_frame(SETTINGS, settings))

    async def _spawn(self) -> None:
        records_ours, records_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        control_ours, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with records_theirs, control_theirs:
            fds = (records_theirs.fileno(), control_theirs.fileno())
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pgscout.worker", *map(str, fds), pass_fds=fds)
        loop = asyncio.get_running_loop()
        started = loop.create_future()
        control, _ = await loop.create_unix_connection(lambda: _ControlProtocol(self, started),
                                                       sock=control_ours)
        control.write(pickled_frame(SETTINGS, self.settings))
        # pgscout is up once analysis is: a statement of the first second is then analysed, and
        # the status page's history starts with the proxy.
        try:
            await asyncio.wait_for(started, _START_TIMEOUT_SECONDS)
        except (TimeoutError, AnalysisUnavailable):
            log.error("analysis_not_started", timeout_seconds=_START_TIMEOUT_SECONDS)
        records, _ = await loop.create_unix_connection(asyncio.Protocol, sock=records_ours)
        self._channel_records = 0
        self._control = control
        self._transport = records

    async def _supervise(self) -> None:
        """An analysis process that dies is started again: observation resumes, traffic never
        noticed. Records made meanwhile are shed (counted)."""
        while not self._stopping:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            log.error("analysis_exited", exit_code=code, restart_in_seconds=_RESTART_DELAY_SECONDS)
            await asyncio.sleep(_RESTART_DELAY_SECONDS)
            if self._stopping:
                return
            self.restarts += 1
            await self._spawn()
            if self.session_records is not None:
                # Ahead of what was made meanwhile: those records name these sessions by conn_id.
                self._batch[:0] = self.session_records()

    def channel_lost(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._transport = None
        self._control = None
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(AnalysisUnavailable("the analysis process went away"))
        self._replies.clear()

    # -- records ---------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._tick)

    def _tick(self) -> None:
        if self.active_sessions is not None:
            now = time.monotonic()
            if now - self._active_told_at >= ACTIVE_SECONDS:
                self._active_told_at = now
                active = self.active_sessions()
                if active:
                    self.put((ACTIVE, now, active))
        self.flush()
        if not self._stopping:
            self._schedule_flush()

    def flush(self) -> None:
        batch = self._batch
        if not batch:
            return
        sending = batch[:]
        batch.clear()  # `put` stays bound to this same list
        transport = self._transport
        if transport is None or transport.get_write_buffer_size() > self._backlog_bytes:
            kept = [record for record in sending if record[0] != STATEMENT]
            self.records_shed += len(sending) - len(kept)
            if transport is None or not kept:
                return
            sending = kept
        transport.write(records_frame(sending))
        self.records_sent += len(sending)
        self._channel_records += len(sending)

    @property
    def backlog_bytes(self) -> int:
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    # -- requests --------------------------------------------------------------------------
    async def request(self, request: dict, snapshot: object, timeout: float) -> object:
        """Ask the analysis process to answer an admin request, once it has analysed the records
        made before it (or after records.REQUEST_CATCH_UP_SECONDS, if it is that far behind)."""
        self.flush()
        control = self._control
        if control is None:
            raise AnalysisUnavailable("the analysis process is not running")
        request_id = next(self._ids)
        reply = asyncio.get_running_loop().create_future()
        self._replies[request_id] = reply
        control.write(pickled_frame(REQUEST, (request_id, request, snapshot, self._channel_records)))
        try:
            return await asyncio.wait_for(reply, timeout)
        except TimeoutError:
            raise AnalysisUnavailable(f"the analysis process did not answer within {timeout:g} s")
        finally:
            self._replies.pop(request_id, None)

    def replied(self, request_id: int, response: object) -> None:
        reply = self._replies.get(request_id)
        if reply is not None and not reply.done():
            reply.set_result(response)


class _ControlProtocol(asyncio.Protocol):
    def __init__(self, link: AnalysisLink, started: asyncio.Future) -> None:
        self.link = link
        self.started = started
        self.reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        for kind, payload in self.reader.feed(data):
            if kind == REPLY:
                request_id, response = decode_payload(kind, payload)
                self.link.replied(request_id, response)
            elif kind == STARTED and not self.started.done():
                self.started.set_result(None)
            elif kind == LOG:
                level, fields = decode_payload(kind, payload)
                fields.pop("level", None)
                fields.pop("timestamp", None)
                getattr(analysis_log, level)(fields.pop("event"), **fields)

    def connection_lost(self, exc) -> None:
        if not self.started.done():
            self.started.set_exception(AnalysisUnavailable("the analysis process exited at start"))
        self.link.channel_lost()


class Frozen:
    """A picklable stand-in for a live data-plane object: its values at snapshot time, read
    with the same attribute and method names the exposition code uses on the live object."""

    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


class _Value:
    """A method of a Frozen object: returns what the live method returned at snapshot time."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __call__(self) -> object:
        return self.value

    def __getstate__(self):
        return self.value

    def __setstate__(self, value) -> None:
        self.value = value


def freeze(live: object, *, calls: tuple[str, ...] = (), attributes: tuple[str, ...] = (),
           numbers: bool = False, **extra: object) -> Frozen:
    """Take `calls` (methods, called now), `attributes`, every plain number/flag attribute when
    `numbers`, and `extra` values from `live`."""
    values: dict = {}
    if numbers:
        values.update((name, value) for name, value in vars(live).items()
                      if isinstance(value, (bool, int, float)))
    values.update((name, getattr(live, name)) for name in attributes)
    values.update((name, _Value(getattr(live, name)())) for name in calls)
    values.update(extra)
    return Frozen(values)
