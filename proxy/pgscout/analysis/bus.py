"""Event fan-out from decoders to observers.

Owns: the subscription table (event type -> handlers, in subscription order) and the rule that an
observer's exception is contained: counted per handler, reported once through `on_error`, and
never propagated into the data path.
Must not: queue, copy or transform events; it calls handlers synchronously, in order, so an
enrichment observer subscribed first (fingerprints) is seen by every later one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


class Bus:
    def __init__(self, on_error: Callable[[Callable, BaseException], None]):
        self._handlers: dict[type, list[Callable]] = defaultdict(list)
        self._on_error = on_error
        self.errors: dict[str, int] = defaultdict(int)  # handler qualname -> exceptions raised

    def subscribe(self, event_type: type, handler: Callable[[object], None]) -> None:
        self._handlers[event_type].append(handler)

    def handlers(self, event_type: type) -> tuple[Callable, ...]:
        """The handlers of one event type, in the order they are called."""
        return tuple(self._handlers.get(event_type, ()))

    def publish(self, event: object) -> None:
        for handler in self._handlers.get(type(event), ()):
            try:
                handler(event)
            except Exception as exc:  # an observer bug must not break the application's traffic
                name = getattr(handler, "__qualname__", repr(handler))
                self.errors[name] += 1
                if self.errors[name] == 1:
                    self._on_error(handler, exc)
