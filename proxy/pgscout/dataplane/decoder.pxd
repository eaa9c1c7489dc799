# Cython declarations for decoder.py (augmenting: the .py file is the source, compiled or not).
cimport cython
from pgscout.dataplane cimport records, wire
from pgscout.dataplane.framer cimport Framer, MessageSink, int16, int32

cdef int EXECUTE, SYNC, QUERY, FUNCTION
cdef Py_ssize_t _MAX_HELD_EVENTS, _MAX_STATEMENTS, _MAX_STATEMENT_CHARS, _COMPACT_PENDING
cdef tuple _KIND_NAMES, _UNKNOWN
cdef frozenset _REPORTED_PARAMETERS
cdef str _CHARS
cdef _Request _ONE_SYNC

cdef class TextBudget:
    cdef public Py_ssize_t limit
    cdef public Py_ssize_t used

@cython.freelist(8)
cdef class _Request:
    cdef public int kind
    cdef public double sent_at
    cdef public _Portal portal
    cdef public bint pipelined
    cdef public Py_ssize_t count

cdef class _Query(_Request):
    cdef public str sql
    cdef public bint truncated
    cdef public object param_sig
    cdef public Py_ssize_t statements
    cdef public object rows
    cdef public str tag
    cdef public object sqlstate
    cdef public double done_at
    cdef public bint deallocated

@cython.freelist(8)
cdef class _Portal:
    cdef public str sql
    cdef public bint truncated
    cdef public object param_sig
    cdef public Py_ssize_t n_params
    cdef public object params
    cdef public double suspended_at
    cdef public object suspended_rows

@cython.locals(request=_Request)
cdef _Request _new_request(int kind, double sent_at, _Portal portal=*)
cdef inline _start_request(_Request request, int kind, double sent_at, _Portal portal)
@cython.locals(query=_Query)
cdef _Query _new_query(str sql, bint truncated, object param_sig, double sent_at)
@cython.locals(portal=_Portal)
cdef _Portal _new_portal(str sql, bint truncated, object param_sig, Py_ssize_t n_params, object params)

cdef class _Pending:
    cdef list _items
    cdef Py_ssize_t _first
    cdef Py_ssize_t _end

    cpdef _Request first(self)
    cpdef _Request last(self)
    cpdef append(self, _Request request)
    cpdef replace_last(self, _Request request)
    cpdef appendleft(self, _Request request)
    @cython.locals(items=list, first=Py_ssize_t, request=_Request)
    cpdef _Request popleft(self)

cdef class Decoder:
    cdef public object session
    cdef public object cancel_key
    cdef object _emit
    cdef object _on_ready
    cdef bint _keep_parameters
    cdef Py_ssize_t _max_sql_chars
    cdef double _now
    cdef public _Pending _pending
    cdef Py_ssize_t _max_pending
    cdef bint _active
    cdef str _txn_status
    cdef dict _statements
    cdef bytes _bound_name
    cdef tuple _bound_text
    cdef Py_ssize_t _statement_chars
    cdef TextBudget _texts
    cdef _Portal _portal
    cdef bytes _portal_name
    cdef dict _portals
    cdef list _held
    cdef Py_ssize_t _held_count
    cdef str _reported_status
    cdef bint _discarding
    cdef Py_ssize_t _open_executes
    cdef _Request _last_execute
    cdef Py_ssize_t _group_executes
    cdef Py_ssize_t _suspended
    cdef bint _copy_in
    cdef bint _ready
    cdef double _work_started_at
    cdef double _txn_started_at
    cdef double _idle_since
    cdef double _idle_in_txn
    cdef str _last_tag
    cdef bint _last_error
    cdef bytes _tag_body
    cdef str _tag
    cdef object _tag_row_count
    cdef public Framer client
    cdef public Framer server

    cpdef client_data(self, bytes data, double now)
    cpdef server_data(self, bytes data, double now)
    cdef _push(self, _Request request)
    cdef _set_active(self, bint active)
    @cython.locals(limit=Py_ssize_t)
    cdef tuple _cut(self, bytes body, Py_ssize_t start, Py_ssize_t end)
    @cython.locals(end=Py_ssize_t)
    cdef _query(self, bytes body)
    @cython.locals(name_end=Py_ssize_t, query_end=Py_ssize_t, name=bytes, statements=dict, text=tuple,
                   size=Py_ssize_t, texts=TextBudget)
    cdef _parse(self, bytes body)
    @cython.locals(portal_end=Py_ssize_t, statement_end=Py_ssize_t, pos=Py_ssize_t, n_formats=Py_ssize_t,
                   n_params=Py_ssize_t, values=bytes, bound=bytes, old=_Portal, name=bytes)
    cdef _bind(self, bytes data, Py_ssize_t start, Py_ssize_t end, bint complete)
    @cython.locals(name_end=Py_ssize_t, portal=_Portal, request=_Request)
    cdef _execute(self, bytes data, Py_ssize_t start, Py_ssize_t end)
    @cython.locals(name=bytes, portal=_Portal)
    cdef _close(self, bytes body)
    @cython.locals(pending=_Pending)
    cdef _sync(self)
    cdef _sync_run(self, Py_ssize_t count)
    @cython.locals(pending=_Pending, run=_Request)
    cdef _add_syncs(self, Py_ssize_t count)
    cdef _function_call(self)
    cdef _copy_done(self)
    @cython.locals(request=_Request)
    cdef _Request _expect(self, int kind)
    @cython.locals(body=bytes)
    cdef _command_complete(self, bytes data, Py_ssize_t start, Py_ssize_t end)
    cdef _empty_query_response(self)
    @cython.locals(request=_Request, portal=_Portal)
    cdef _portal_suspended(self)
    @cython.locals(pending=_Pending, head=_Request)
    cdef _copy_in_response(self)
    @cython.locals(head=_Request, request=_Request)
    cdef _error_response(self, bytes body)
    @cython.locals(status=str, idle=bint, pending=_Pending, head=_Request, previous=str, current=_Portal)
    cdef _ready_for_query(self, bytes data, Py_ssize_t start, Py_ssize_t end)
    @cython.locals(remaining=Py_ssize_t, taken=Py_ssize_t, pending=_Pending, run=_Request)
    cdef _ready_run(self, bytes data, Py_ssize_t start, Py_ssize_t end, Py_ssize_t count)
    cdef _backend_key_data(self, bytes body)
    @cython.locals(name_end=Py_ssize_t, name=bytes)
    cdef _parameter_status(self, bytes body)
    @cython.locals(head=_Request, request=_Request)
    cdef _statement_done(self, str tag, object rows, object sqlstate)
    cdef _query_statement_done(self, _Query query, str tag, object rows, object sqlstate)
    cdef _query_done(self, _Query query)
    cdef _finish(self, _Portal portal, double sent_at, bint extended, bint pipelined, str tag,
                 object rows, object sqlstate, object data_rows=*)
    cdef _finish_suspended(self, _Portal portal)
    @cython.locals(held=list, count=Py_ssize_t)
    cdef _hold(self, tuple record)
    @cython.locals(owed=Py_ssize_t, request=_Request, answered=Py_ssize_t, held=list, index=Py_ssize_t,
                   record=tuple)
    cdef _mark_group_pipelined(self)
    @cython.locals(held=list, index=Py_ssize_t)
    cdef _emit_held(self, str status)
    cdef _track_pool_statements(self, str sql, str tag, object sqlstate)
    cdef _forget_statement(self, bytes name)
    @cython.locals(portal=_Portal)
    cdef _Portal _take_portal(self, bytes name)
    cdef _release(self, Py_ssize_t size)
    cdef _end_transaction(self, str previous)

cdef class _ClientMessages(MessageSink):
    cdef Decoder _decoder

cdef class _ServerMessages(MessageSink):
    cdef Decoder _decoder

@cython.locals(pos=Py_ssize_t)
cdef Py_ssize_t _string_end(bytes data, Py_ssize_t start, Py_ssize_t end) except -1
cdef Py_ssize_t _int16_before(bytes data, Py_ssize_t pos, Py_ssize_t end) except? -1
@cython.locals(size=Py_ssize_t, i=Py_ssize_t)
cdef bint _equal_at(bytes data, Py_ssize_t start, Py_ssize_t end, bytes other) except -1
