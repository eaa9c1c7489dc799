"""Event fan-out from decoders to observers.

Owns: the subscription tables (StatementDone's observers; every other event type to its
handlers), called in subscription order, and the rule that an observer's exception is contained:
counted per handler, reported once through `on_error`, and never propagated into the data path.
StatementDone, one per statement, goes to objects of the StatementObserver trait: compiled, each
call is a native method call, where calling a bound method is a Python-level call (about 200
instructions, eight times per statement); the rare events keep plain callables.
Must not: queue, copy or transform events; it calls handlers synchronously, in order, so an
enrichment observer subscribed first (fingerprints) is seen by every later one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from mypy_extensions import mypyc_attr, trait

from pgscout.dataplane.events import StatementDone


@trait
class StatementObserver:
    """An observer of every completed statement."""

    def on_statement(self, ev: StatementDone) -> None:
        raise NotImplementedError


# Tests record the events a decoder's records replay to with a subclass.
@mypyc_attr(allow_interpreted_subclasses=True)
class Bus:
    def __init__(self, on_error: Callable[[Callable, BaseException], None]):
        self._statement_observers: list[StatementObserver] = []
        self._handlers: dict[type, list[Callable]] = defaultdict(list)
        self._on_error = on_error
        self.errors: dict[str, int] = defaultdict(int)  # handler qualname -> exceptions raised

    def subscribe_statements(self, observer: StatementObserver) -> None:
        self._statement_observers.append(observer)

    def subscribe(self, event_type: type, handler: Callable[[object], None]) -> None:
        if event_type is StatementDone:
            raise TypeError("StatementDone observers subscribe with subscribe_statements")
        self._handlers[event_type].append(handler)

    def handlers(self, event_type: type) -> tuple[Callable, ...]:
        """The handlers of one event type, in the order they are called."""
        if event_type is StatementDone:
            return tuple(observer.on_statement for observer in self._statement_observers)
        return tuple(self._handlers.get(event_type, ()))

    def publish(self, event: object) -> None:
        if isinstance(event, StatementDone):
            self.publish_statement(event)
            return
        for handler in self._handlers.get(type(event), ()):
            try:
                handler(event)
            except Exception as exc:
                self._failed(handler, exc)

    def publish_statement(self, event: StatementDone) -> None:
        for observer in self._statement_observers:
            try:
                observer.on_statement(event)
            except Exception as exc:  # an observer bug must not break the application's traffic
                self._failed(observer.on_statement, exc)

    def _failed(self, handler: Callable, exc: Exception) -> None:
        name = getattr(handler, "__qualname__", repr(handler))
        self.errors[name] += 1
        if self.errors[name] == 1:
            self._on_error(handler, exc)
