"""Analysis: plain-Python state built from the data plane's records, off the forwarding loop."""
