"""pgscout: a transparent PostgreSQL wire-protocol sidecar that observes what it forwards."""

__version__ = "0.1.0"
