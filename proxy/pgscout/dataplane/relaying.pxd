# Cython declarations for relaying.py (augmenting: the .py file is the source, compiled or not).
cimport cython
from pgscout.dataplane.decoder cimport Decoder

cdef object _monotonic

cdef class RelayingLeg:
    cdef public object leg
    cdef object write
    cdef public Decoder decoder
    cdef object relay
    cdef public Py_ssize_t relayed

cdef class RelayingClientLeg(RelayingLeg):
    cdef bint said_goodbye

    @cython.locals(end=Py_ssize_t, goodbye=bint, decoder=Decoder)
    cpdef data_received(self, bytes data)

cdef class RelayingServerLeg(RelayingLeg):
    @cython.locals(decoder=Decoder)
    cpdef data_received(self, bytes data)
