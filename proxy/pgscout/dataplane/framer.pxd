# Cython declarations for framer.py (augmenting: the .py file is the source, compiled or not).
cimport cython
from pgscout.dataplane cimport wire

cdef int _SKIP, _DELIVER, _DELIVER_RUNS
cdef Py_ssize_t _MAX_RUN_LENGTH, _MAX_RUN_PATTERNS

cdef Py_ssize_t _POSTGRES_MAX_LENGTH

@cython.locals(value=Py_ssize_t)
cpdef Py_ssize_t int32(bytes data, Py_ssize_t pos) except? -1

@cython.locals(value=Py_ssize_t)
cpdef Py_ssize_t int16(bytes data, Py_ssize_t pos) except? -1

cdef class MessageSink:
    cpdef message(self, int typ, bytes data, Py_ssize_t start, Py_ssize_t end, bint complete)
    cpdef run(self, int typ, bytes data, Py_ssize_t start, Py_ssize_t end, Py_ssize_t count)

cdef class Framer:
    cdef MessageSink _sink
    cdef bytes _actions
    cdef dict _run_patterns
    cdef Py_ssize_t _decode_limit
    cdef Py_ssize_t _skip
    cdef bytes _head
    cdef int _type
    cdef bytearray _body
    cdef Py_ssize_t _want
    cdef Py_ssize_t _after
    cdef public Py_ssize_t data_rows

    @cython.locals(end=Py_ssize_t, pos=Py_ssize_t, rows=Py_ssize_t, typ=int, length=Py_ssize_t,
                   msg_end=Py_ssize_t, whole_up_to=Py_ssize_t, action=int, count=Py_ssize_t,
                   need=Py_ssize_t, actions=bytes, sink=MessageSink)
    cpdef feed(self, bytes data)
    cdef Py_ssize_t _run_count(self, bytes data, Py_ssize_t pos, Py_ssize_t msg_end) except -1
    @cython.locals(typ=int, length=Py_ssize_t, body_len=Py_ssize_t, available=Py_ssize_t)
    cdef Py_ssize_t _begin(self, bytes header, Py_ssize_t hpos, bytes data, Py_ssize_t pos) except -1
    @cython.locals(take=Py_ssize_t, available=Py_ssize_t, complete=bint)
    cdef Py_ssize_t _collect(self, bytes data, Py_ssize_t pos=*) except -1
