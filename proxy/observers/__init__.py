"""Observers: plain-Python state built from decoder events (see proxy/events.py).

Each module owns one concern. Observers import no asyncio, sockets or prometheus_client and never
log per message; they are fed by the bus on the hot path's thread, so they stay cheap.
"""
