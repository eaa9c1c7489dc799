"""Exposition: the admin HTTP server, the JSON API, Prometheus metrics and the status page."""
