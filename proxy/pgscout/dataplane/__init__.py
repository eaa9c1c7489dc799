"""The data plane: bytes in, bytes out, and one compact record per statement out."""
