# records.py's record kinds and STATEMENT positions as C constants for the Cython-compiled
# decoder; tests/test_fallback.py checks they equal records.py's values.
cdef enum:
    ACTIVE = 7
    CLOSED = 5
    OPENED = 0
    PARAMETER = 2
    READY = 1
    STATEMENT = 3
    STATUS = 6
    S_CONN = 1
    S_COUNT = 3
    S_DONE_AT = 6
    S_EXTENDED = 4
    S_N_PARAMS = 11
    S_PARAMS = 12
    S_PARAM_SIG = 10
    S_PIPELINED = 13
    S_ROWS = 8
    S_SENT_AT = 5
    S_SQL = 2
    S_SQLSTATE = 9
    S_TAG = 7
    S_TRUNCATED = 14
    TRANSACTION = 4
