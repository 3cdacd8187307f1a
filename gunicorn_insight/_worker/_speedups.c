/* The two request hooks of gunicorn_insight._worker.recorder, compiled: same scoreboard bytes, one C call each.
 *
 * Why this exists: in the benchmark the pure-Python hooks cost about 4 us per request on a core of their
 * own and about 9 us when the load shares the cores, because their bytecode, the interpreter paths and the
 * objects they touch are fetched cold on every request (docs/performance.md). Here each hook is one C call
 * touching the request's attributes, two dicts, a list and the slot's scoreboard lines.
 *
 * The Python module stays the definition. Everything unusual is handed to it before any state changes:
 * no free entry, a path, query or method that is not a plain str, a non-ASCII method. Rarer steps that need Python anyway call the same Python functions (describe_peer,
 * parse_status, parse_request_start, queue_header, route_number, add_overflow), and every
 * error is handed to _report.report, as the Python hooks do. Layouts: gunicorn_insight/_scoreboard.py.
 *
 * The GIL is held throughout, and no Python code runs between reading the ring head and publishing the
 * next one. gthread's recorder has a lock, which post_request holds from start to end as the Python hook
 * does (a callback into Python may let another request thread run); pre_request takes it only for the
 * overflow count, which the Python hook does. A free-threaded Python never imports this module
 * (_worker._compiled).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <string.h>
#include <structmember.h>
#include <sys/socket.h>
#include <time.h>

#if PY_BIG_ENDIAN
#error "the scoreboard is little-endian; big-endian machines use the pure-Python hooks"
#endif

/* ENTRY = "<B7xdQ8s46sH176s", RING = "<ddHHHHd", HEAD_CONNS = "<QI" (checked against _scoreboard by bind). */
#define ENTRY_SIZE 256
#define ENTRY_START 8
#define ENTRY_THREAD 16
#define ENTRY_METHOD 24
#define METHOD_WIDTH 8
#define ENTRY_HOST 32
#define HOST_WIDTH 46
#define ENTRY_PORT 78
#define ENTRY_PATH 80
#define PATH_WIDTH 176
#define RING_SIZE 32
#define DYING 3 /* FLAG_ABORT_HANDLER | FLAG_INT_HANDLER */
#define RECORD_CLIENT_CLOSED 1
#define TCP_INFO_BYTES 28 /* up to tcpi_unacked (u32 at byte 24) */
#define STATE_CLOSE 7
#define STATE_CLOSE_WAIT 8

/* What bind() hands over from the Python side: the module globals holding RECORDER, and the functions the
 * rare paths call. */
static PyObject *worker_globals, *python_pre_request, *python_post_request, *report, *describe_peer,
    *parse_status, *parse_request_start, *queue_header, *method_index;
static PyObject *s_RECORDER, *s_path, *s_query, *s_method, *s_peer_addr, *s_status_code, *s_nr_conns,
    *s_route_number, *s_add_overflow, *s_headers, *s_acquire, *s_release, *s_request_start_key,
    *s_queue_start_key, *s_route_key, *s_sock, *s_client_gone, *s_busy_header, *s_queue_ms_header, *s_no_queue;
/* X-GUNICORN-BUSY's values, made once each: a count of busy workers is small */
#define BUSY_TEXTS 64
static PyObject *busy_texts[BUSY_TEXTS];
static PyObject *minus_one, *hung_up, *not_in_flight;
static long other_method;
/* method_index's keys, compared by length and bytes: a method is a new str per request, and hashing it for the
 * dict costs more than these few comparisons. `complete`: every key is here, so a str found in none is none. */
#define KNOWN_METHODS 16
static struct {
    char text[16];
    Py_ssize_t length;
    long number;
} known_methods[KNOWN_METHODS];
static int known_method_count, known_methods_complete;
static PyObject *current_task(PyObject *module, PyObject *unused);
static double hang_up_check_after; /* recorder.HANG_UP_CHECK_AFTER, from bind() */
static PyTypeObject RecordingType; /* the ASGI layer's request, below */

/* The recording ASGI layer's request (see asgi_start, below). */
typedef struct {
    PyObject_HEAD
    /* what the hooks read, as members: the request's, and the response's status_code (500 until the
     * application starts its response, what the server answers when it fails before) */
    PyObject *method, *path, *query, *peer_addr, *status_code;
    PyObject *worker, *scope, *root_path, *send;
    PyObject *no_socket; /* always NULL: the "sock" member, None, for post_request's client_closed */
    /* Its in-flight record, kept here rather than in a tuple of its own (pre_request puts the Recording itself
     * in the recorder's _entry_requests, where it reads as that tuple: see recording_item); entry_number NULL:
     * none. */
    double start, cpu_start;
    PyObject *entry_number, *current, *shown;
    Py_ssize_t entry_index; /* its place in the recorder's _entry_requests, where it is in flight; -1: none */
    char finished, routes;
} Recording;

/* object.<name>: a Recording's field read straight (no attribute lookup, no getattro, for the layer's every
 * request), anything else's attribute. */
#define REQUEST_ATTRIBUTE(object, name, field)                                                                    \
    (Py_TYPE(object) == &RecordingType                                                                          \
         ? Py_NewRef(((Recording *)(object))->field != NULL ? ((Recording *)(object))->field : Py_None)         \
         : PyObject_GetAttr(object, name))

/* The recorder the fields below were read from (a strong reference, so its address cannot be reused). */
typedef struct {
    PyObject *recorder;
    int delegate; /* 1: the recorder is not the kind this file was written for: the Python hooks serve */
    PyObject *lock; /* gthread's: post_request holds it throughout, as the Python hook does; NULL: none */
    PyObject *buffer, *free_entries, *in_flight, *entry_requests, *current, *excluded, *route_ids,
        *request_worker; /* recorder._request_worker: whose nr_conns each request publishes, or None */
    Py_ssize_t head_offset, ring_offset, flags_offset, entries_offset;
    unsigned long long mask;
    int redact, queue, atoms, routes, resolves_by_key, thread_cpu;
    /* excluded is a frozenset of str: bit n of excluded_lengths is set when one of them is n characters long
     * (n < 256; excluded_long: one is longer), so a path of another length is not hashed to be looked up */
    int excluded_filter, excluded_long;
    unsigned char excluded_lengths[32];
    int current_is_ours; /* _current is this module's current_task: called as a C function */
    /* The route template the last request was numbered by, and its number: an application's routes are few,
     * and a framework hands the same template object to each request of a route, so the next request usually
     * needs no lookup in route_ids (whose numbers never change while the recorder is bound). */
    PyObject *last_route_key, *last_route_id;
    /* atoms only: per slot, the offsets of its state byte, its first entry and the end of its entries; the
     * state of a slot that serves (recorder._busy_layout, from Scoreboard.flag_slices) */
    Py_ssize_t *busy_offsets, busy_slots;
    int ready_state;
    /* the scoreboard, held exported for as long as the recorder is bound: no buffer request per hook (a closed
     * scoreboard stays mapped until then, as it does for the recorder's own views) */
    Py_buffer view;
    int viewing;
} Bound;

static Bound bound;

static void
clear_bound(void)
{
    Py_CLEAR(bound.recorder);
    if (bound.viewing) {
        PyBuffer_Release(&bound.view);
        bound.viewing = 0;
    }
    Py_CLEAR(bound.buffer);
    Py_CLEAR(bound.free_entries);
    Py_CLEAR(bound.in_flight);
    Py_CLEAR(bound.entry_requests);
    Py_CLEAR(bound.current);
    Py_CLEAR(bound.excluded);
    Py_CLEAR(bound.route_ids);
    Py_CLEAR(bound.last_route_key);
    Py_CLEAR(bound.last_route_id);
    Py_CLEAR(bound.request_worker);
    Py_CLEAR(bound.lock);
    PyMem_Free(bound.busy_offsets);
    bound.busy_offsets = NULL;
    bound.busy_slots = 0;
    bound.delegate = 1;
}

static int
read_ssize(PyObject *obj, const char *name, Py_ssize_t *out)
{
    PyObject *value = PyObject_GetAttrString(obj, name);
    if (value == NULL)
        return -1;
    *out = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
read_flag(PyObject *obj, const char *name, int *out)
{
    PyObject *value = PyObject_GetAttrString(obj, name);
    if (value == NULL)
        return -1;
    *out = PyObject_IsTrue(value);
    Py_DECREF(value);
    return *out < 0 ? -1 : 0;
}

static int
read_object(PyObject *obj, const char *name, PyObject **out)
{
    *out = PyObject_GetAttrString(obj, name);
    return *out == NULL ? -1 : 0;
}

/* recorder._busy_layout = (ready state, ((state, first, end), ...)) into bound's C array. */
static int
read_busy_layout(PyObject *recorder)
{
    PyObject *layout, *slots;
    Py_ssize_t count, index;
    long ready;
    if (read_object(recorder, "_busy_layout", &layout) < 0)
        return -1;
    if (!PyTuple_Check(layout) || PyTuple_GET_SIZE(layout) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(layout, 1))) {
        Py_DECREF(layout);
        PyErr_SetString(PyExc_TypeError, "recorder._busy_layout is not (ready, ((state, first, end), ...))");
        return -1;
    }
    ready = PyLong_AsLong(PyTuple_GET_ITEM(layout, 0));
    slots = PyTuple_GET_ITEM(layout, 1);
    count = PyTuple_GET_SIZE(slots);
    bound.busy_offsets = PyMem_New(Py_ssize_t, 3 * count + 1);
    if (bound.busy_offsets == NULL || (ready == -1 && PyErr_Occurred())) {
        Py_DECREF(layout);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    for (index = 0; index < count; index++) {
        PyObject *slot = PyTuple_GET_ITEM(slots, index);
        if (!PyArg_ParseTuple(slot, "nnn", &bound.busy_offsets[3 * index], &bound.busy_offsets[3 * index + 1],
                              &bound.busy_offsets[3 * index + 2])) {
            Py_DECREF(layout);
            return -1;
        }
    }
    bound.busy_slots = count;
    bound.ready_state = (int)ready;
    Py_DECREF(layout);
    return 0;
}

/* bound.excluded_lengths from bound.excluded; a set that could change, or holds anything but str, is always
 * asked instead. */
static int
read_excluded_lengths(void)
{
    PyObject *paths, *path;
    int filter = 1;
    memset(bound.excluded_lengths, 0, sizeof bound.excluded_lengths);
    bound.excluded_long = 0;
    bound.excluded_filter = 0;
    if (!PyFrozenSet_CheckExact(bound.excluded))
        return 0;
    if ((paths = PyObject_GetIter(bound.excluded)) == NULL)
        return -1;
    while (filter && (path = PyIter_Next(paths)) != NULL) {
        Py_ssize_t length;
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_CheckExact(path) && PyUnicode_READY(path) < 0) {
            Py_DECREF(path);
            break;
        }
#endif
        if (!PyUnicode_CheckExact(path))
            filter = 0;
        else if ((length = PyUnicode_GET_LENGTH(path)) < 256)
            bound.excluded_lengths[length >> 3] |= (unsigned char)(1u << (length & 7));
        else
            bound.excluded_long = 1;
        Py_DECREF(path);
    }
    Py_DECREF(paths);
    if (PyErr_Occurred())
        return -1;
    bound.excluded_filter = filter;
    return 0;
}

/* Whether path (a ready str) may be one of the excluded paths: its length is one of theirs. */
static inline int
may_be_excluded(PyObject *path)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(path);
    if (!bound.excluded_filter)
        return 1;
    if (length >= 256)
        return bound.excluded_long;
    return (bound.excluded_lengths[length >> 3] >> (length & 7)) & 1;
}

/* Read a new recorder's fields once: a worker makes one recorder, so this runs once per worker. */
static int
bind_recorder(PyObject *recorder)
{
    PyObject *lock = NULL;
    Py_ssize_t mask;
    clear_bound();
    bound.recorder = Py_NewRef(recorder);
    if (read_object(recorder, "lock", &lock) < 0)
        return -1;
    if (lock == Py_None)
        Py_DECREF(lock);
    else
        bound.lock = lock;
    bound.delegate = 0;
    if (read_object(recorder, "_buffer", &bound.buffer) < 0 || read_object(recorder, "_free", &bound.free_entries) < 0
        || read_object(recorder, "in_flight", &bound.in_flight) < 0
        || read_object(recorder, "_entry_requests", &bound.entry_requests) < 0
        || read_ssize(recorder, "_entries_offset", &bound.entries_offset) < 0
        || read_object(recorder, "_current", &bound.current) < 0
        || read_object(recorder, "_excluded", &bound.excluded) < 0
        || read_object(recorder, "_route_ids", &bound.route_ids) < 0
        || read_object(recorder, "_request_worker", &bound.request_worker) < 0
        || read_ssize(recorder, "_head_offset", &bound.head_offset) < 0
        || read_ssize(recorder, "_ring_offset", &bound.ring_offset) < 0
        || read_ssize(recorder, "_flags_offset", &bound.flags_offset) < 0 || read_ssize(recorder, "_mask", &mask) < 0
        || read_flag(recorder, "_redact", &bound.redact) < 0 || read_flag(recorder, "_queue", &bound.queue) < 0
        || read_flag(recorder, "_atoms", &bound.atoms) < 0 || read_flag(recorder, "_routes", &bound.routes) < 0
        || read_flag(recorder, "_resolves_by_key", &bound.resolves_by_key) < 0
        || read_flag(recorder, "_thread_cpu", &bound.thread_cpu) < 0
        || (bound.atoms && read_busy_layout(recorder) < 0)) {
        clear_bound();
        return -1;
    }
    if (!PyList_CheckExact(bound.free_entries) || !PyDict_CheckExact(bound.in_flight)
        || !PyList_CheckExact(bound.entry_requests)
        || !PyDict_CheckExact(bound.route_ids) || !PyAnySet_Check(bound.excluded)) {
        bound.delegate = 1; /* not the recorder this file was written against: the Python hooks still are */
        return 0;
    }
    if (PyObject_GetBuffer(bound.buffer, &bound.view, PyBUF_WRITABLE) < 0) {
        clear_bound();
        return -1;
    }
    bound.viewing = 1;
    if (read_excluded_lengths() < 0) {
        clear_bound();
        return -1;
    }
    bound.current_is_ours = PyCFunction_Check(bound.current)
                            && PyCFunction_GET_FUNCTION(bound.current) == (PyCFunction)current_task;
    bound.mask = (unsigned long long)mask;
    return 0;
}

/* The recorder this process records into, bound; NULL (no exception) when there is none. */
static PyObject *
current_recorder(int *failed)
{
    PyObject *recorder;
    *failed = 0;
    if (worker_globals == NULL)
        return NULL; /* _worker has not bound this module: it is not in use */
    recorder = PyDict_GetItemWithError(worker_globals, s_RECORDER);
    if (recorder == NULL || recorder == Py_None) {
        *failed = PyErr_Occurred() != NULL;
        return NULL;
    }
    if (recorder != bound.recorder && bind_recorder(recorder) < 0) {
        *failed = 1;
        return NULL;
    }
    return recorder;
}

/* Hand the pending exception to _report.report, as the Python hooks' except clause does. Cold: the compiler
 * lays out the paths that lead here apart from the hooks' usual path, which then spans fewer instruction-cache
 * lines (the interpreter around it is bound by that cache). */
static void __attribute__((cold))
report_error(const char *hook)
{
    PyObject *value, *result;
#if PY_VERSION_HEX >= 0x030C0000
    value = PyErr_GetRaisedException();
#else
    PyObject *type, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL)
        PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
#endif
    result = PyObject_CallFunction(report, "sO", hook, value ? value : Py_None);
    Py_XDECREF(result);
    PyErr_Clear(); /* report swallows its own errors; nothing may reach gunicorn */
    Py_XDECREF(value);
}

/* What the recording ASGI layer has read from a finished request's scope, for finish_request in place of an
 * environ: a dict built per request only to be read back would cost more than the rest of the recording. */
typedef struct {
    PyObject *scope;
    PyObject *stamp_key, *stamp; /* the queue stamp's environ key and header value, or NULL: none */
    PyObject *route;             /* the route template, or None */
} AsgiEnd;

static PyObject *asgi_environ(const AsgiEnd *end);

/* What both hooks do first. 1: go on in C with *recorder. 0: return *result instead, which is None (no
 * recorder in this process, or the plugin's own error, reported) or what the Python hook returned (a recorder
 * this file was not written for). NULL with an exception: gunicorn called the hook with the wrong arity. `end`:
 * the layer's request finishing, whose environ the Python post_request needs. */
static int
begin(const char *hook, Py_ssize_t arity, PyObject *python_hook, PyObject *const *args, Py_ssize_t nargs,
      const AsgiEnd *end, PyObject **recorder, PyObject **result)
{
    int failed;
    if (nargs != arity) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments (%zd given)", hook, arity, nargs);
        *result = NULL;
        return 0;
    }
    *recorder = current_recorder(&failed);
    if (*recorder == NULL) {
        if (failed)
            report_error(hook);
        *result = Py_NewRef(Py_None);
        return 0;
    }
    if (bound.delegate && end != NULL) {
        PyObject *environ = asgi_environ(end), *delegated[4] = {args[0], args[1], environ, args[3]};
        *result = environ == NULL ? NULL : PyObject_Vectorcall(python_hook, delegated, 4, NULL);
        Py_XDECREF(environ);
        return 0;
    }
    if (bound.delegate) {
        *result = PyObject_Vectorcall(python_hook, args, nargs, NULL);
        return 0;
    }
    return 1;
}

static inline double
clock_seconds(clockid_t clock)
{
    struct timespec now;
    clock_gettime(clock, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* struct's "s": the first `width` bytes, the rest zero (the caller zeroed the field). */
static inline void
put_text(char *field, Py_ssize_t width, const char *text, Py_ssize_t length)
{
    memcpy(field, text, (size_t)(length < width ? length : width));
}

static inline void
put_u16(char *at, unsigned long value)
{
    uint16_t word = (uint16_t)value;
    memcpy(at, &word, 2);
}

/* A str's UTF-8, strict, or with "?" for what UTF-8 cannot encode (a lone surrogate), as the Python
 * hook's fallback does. *owner gets a new reference when a bytes object had to be made. */
static const char *
utf8_of(PyObject *text, Py_ssize_t *length, PyObject **owner)
{
    const char *data = PyUnicode_AsUTF8AndSize(text, length);
    *owner = NULL;
    if (data != NULL)
        return data;
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
        return NULL;
    PyErr_Clear();
    *owner = PyUnicode_AsEncodedString(text, "utf-8", "replace");
    if (*owner == NULL)
        return NULL;
    *length = PyBytes_GET_SIZE(*owner);
    return PyBytes_AS_STRING(*owner);
}

static inline int
is_text(PyObject *value)
{
    return value == Py_None || PyUnicode_CheckExact(value);
}

/* recorder.parse_request_start(stamp, wall): seconds the request waited before ``wall`` (the moment it
 * started, as wall-clock time), NaN without a usable stamp, -1 for one that cannot be right. -1 on error. */
static int
queue_seconds(PyObject *stamp, double wall, double *queue)
{
    PyObject *started = PyFloat_FromDouble(wall), *parsed;
    if (started == NULL)
        return -1;
    parsed = PyObject_CallFunctionObjArgs(parse_request_start, stamp, started, NULL);
    Py_DECREF(started);
    if (parsed == NULL)
        return -1;
    *queue = PyFloat_AsDouble(parsed);
    Py_DECREF(parsed);
    return (*queue == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* recorder.add_log_atoms without a Python call: X-GUNICORN-BUSY (live slots with a request in flight, this one
 * included) and X-GUNICORN-QUEUE-MS (from X-Request-Start, else X-Queue-Start; "-" without a usable one)
 * appended to the request's headers, where gunicorn's access log reads %({name}i)s. */
static int
log_atoms(PyObject *req)
{
    PyObject *headers = NULL, *stamp = NULL, *busy_text = NULL, *queue_text = NULL, *pair;
    const Py_buffer *view = &bound.view;
    Py_ssize_t index, at;
    long busy = 0;
    double queue = Py_NAN;
    int status = -1;

    for (index = 0; index < bound.busy_slots; index++) {
        const unsigned char *buf = (const unsigned char *)view->buf;
        Py_ssize_t state = bound.busy_offsets[3 * index], first = bound.busy_offsets[3 * index + 1],
                   end = bound.busy_offsets[3 * index + 2];
        if (state >= view->len || end > view->len || buf[state] != bound.ready_state)
            continue;
        for (at = first; at < end; at += ENTRY_SIZE) {
            if (buf[at]) {
                busy++;
                break;
            }
        }
    }

    if ((headers = PyObject_GetAttr(req, s_headers)) == NULL)
        return -1;
    if (!PyList_Check(headers)) {
        PyErr_SetString(PyExc_TypeError, "req.headers is not a list");
        goto finish;
    }
    for (index = 0; index < PyList_GET_SIZE(headers); index++) {
        PyObject *item = PyList_GET_ITEM(headers, index), *name;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyUnicode_Check(name = PyTuple_GET_ITEM(item, 0)))
            continue;
        if (PyUnicode_CompareWithASCIIString(name, "X-REQUEST-START") == 0) {
            Py_XSETREF(stamp, PyObject_Str(PyTuple_GET_ITEM(item, 1)));
            break;
        }
        if (stamp == NULL && PyUnicode_CompareWithASCIIString(name, "X-QUEUE-START") == 0)
            stamp = PyObject_Str(PyTuple_GET_ITEM(item, 1));
        if (PyErr_Occurred())
            goto finish;
    }
    if (PyErr_Occurred())
        goto finish;
    if (stamp != NULL && queue_seconds(stamp, clock_seconds(CLOCK_REALTIME), &queue) < 0)
        goto finish;
    if (queue >= 0) { /* NaN (no stamp) and -1 (one that cannot be right) both fail this */
        char *text = PyOS_double_to_string(queue * 1000, 'f', 1, 0, NULL);
        if (text == NULL)
            goto finish;
        queue_text = PyUnicode_FromString(text);
        PyMem_Free(text);
    }
    else {
        queue_text = Py_NewRef(s_no_queue);
    }
    if (queue_text == NULL)
        goto finish;
    if (busy < BUSY_TEXTS) {
        if (busy_texts[busy] == NULL && (busy_texts[busy] = PyUnicode_FromFormat("%ld", busy)) == NULL)
            goto finish;
        busy_text = Py_NewRef(busy_texts[busy]);
    }
    else if ((busy_text = PyUnicode_FromFormat("%ld", busy)) == NULL) {
        goto finish;
    }
    if ((pair = PyTuple_Pack(2, s_busy_header, busy_text)) == NULL)
        goto finish;
    status = PyList_Append(headers, pair);
    Py_DECREF(pair);
    if (status == 0) {
        if ((pair = PyTuple_Pack(2, s_queue_ms_header, queue_text)) == NULL)
            status = -1;
        else {
            status = PyList_Append(headers, pair);
            Py_DECREF(pair);
        }
    }
finish:
    Py_XDECREF(headers);
    Py_XDECREF(stamp);
    Py_XDECREF(busy_text);
    Py_XDECREF(queue_text);
    return status;
}

static PyObject *
pre_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *recorder, *req, *path = NULL, *query = NULL, *method = NULL, *peer = NULL, *shown = NULL,
        *current = NULL, *entry_number = NULL, *record = NULL, *peer_text = NULL, *path_bytes = NULL, *result;
    const char *path_data, *host_data = NULL;
    Py_ssize_t path_length, host_length = 0, free_count, entry;
    unsigned long port = 0;
    unsigned long long thread;
    double now, cpu_start;

    if (!begin("pre_request", 2, python_pre_request, args, nargs, NULL, &recorder, &result))
        return result;
    req = args[1];
    now = clock_seconds(CLOCK_MONOTONIC);

    if ((path = REQUEST_ATTRIBUTE(req, s_path, path)) == NULL
        || (query = REQUEST_ATTRIBUTE(req, s_query, query)) == NULL
        || (method = REQUEST_ATTRIBUTE(req, s_method, method)) == NULL)
        goto error;
#if PY_VERSION_HEX < 0x030C0000
    if ((PyUnicode_CheckExact(method) && PyUnicode_READY(method) < 0)
        || (PyUnicode_CheckExact(path) && PyUnicode_READY(path) < 0))
        goto error;
#endif
    free_count = PyList_GET_SIZE(bound.free_entries);
    /* Anything but plain text, or no free entry (the overflow count): the Python hook, before any change. */
    if (!is_text(path) || !is_text(query) || !is_text(method)
        || (method != Py_None && !PyUnicode_IS_ASCII(method)) || free_count == 0) {
        Py_DECREF(path);
        Py_DECREF(query);
        Py_DECREF(method);
        return PyObject_Vectorcall(python_pre_request, args, nargs, NULL);
    }
    if (path == Py_None) {
        Py_SETREF(path, PyUnicode_FromStringAndSize(NULL, 0));
        if (path == NULL)
            goto error;
    }
    if (method == Py_None) {
        Py_SETREF(method, PyUnicode_FromStringAndSize(NULL, 0));
        if (method == NULL)
            goto error;
    }
    if (PySet_GET_SIZE(bound.excluded) > 0 && may_be_excluded(path)) {
        int found = PySet_Contains(bound.excluded, path);
        if (found < 0)
            goto error;
        if (found)
            goto done;
    }
    entry = PyLong_AsSsize_t(PyList_GET_ITEM(bound.free_entries, free_count - 1));
    if (entry == -1 && PyErr_Occurred())
        goto error;
    /* popped as list.pop() pops the last item, without its resize: the list's reference becomes ours */
    entry_number = PyList_GET_ITEM(bound.free_entries, free_count - 1);
    Py_SET_SIZE(bound.free_entries, free_count - 1);
    if (query != Py_None && PyUnicode_GET_LENGTH(query) > 0)
        shown = bound.redact ? PyUnicode_FromFormat("%U?<redacted>", path) : PyUnicode_FromFormat("%U?%U", path, query);
    else
        shown = Py_NewRef(path);
    if (shown == NULL)
        goto error;
    current = bound.current_is_ours ? current_task(NULL, NULL) : PyObject_CallNoArgs(bound.current);
    if (current == NULL)
        goto error;
    /* time.thread_time() is this clock: the request owns its thread (sync, gthread), else NaN */
    cpu_start = bound.thread_cpu ? clock_seconds(CLOCK_THREAD_CPUTIME_ID) : Py_NAN;
    if (Py_TYPE(req) == &RecordingType) {
        /* in flight at its entry's place in a list, not in the in_flight dict: no hashing, no dict insertion
         * and deletion (with their resizes) per request */
        Recording *recording = (Recording *)req;
        Py_ssize_t index = (entry - bound.entries_offset) / ENTRY_SIZE;
        if (entry < bound.entries_offset || (entry - bound.entries_offset) % ENTRY_SIZE
            || index >= PyList_GET_SIZE(bound.entry_requests)) {
            PyErr_Format(PyExc_IndexError, "entry offset %zd is not one of the slot's entries", entry);
            goto error;
        }
        recording->start = now;
        recording->cpu_start = cpu_start;
        recording->entry_index = index;
        Py_XSETREF(recording->entry_number, Py_NewRef(entry_number));
        Py_XSETREF(recording->current, Py_NewRef(current));
        Py_XSETREF(recording->shown, Py_NewRef(shown));
        Py_SETREF(((PyListObject *)bound.entry_requests)->ob_item[index], Py_NewRef(req));
    }
    else {
        record = PyTuple_New(6);
        if (record == NULL)
            goto error;
        PyTuple_SET_ITEM(record, 0, PyFloat_FromDouble(now));
        PyTuple_SET_ITEM(record, 1, Py_NewRef(entry_number));
        PyTuple_SET_ITEM(record, 2, Py_NewRef(current));
        PyTuple_SET_ITEM(record, 3, Py_NewRef(method));
        PyTuple_SET_ITEM(record, 4, Py_NewRef(shown));
        PyTuple_SET_ITEM(record, 5, PyFloat_FromDouble(cpu_start));
        if (PyTuple_GET_ITEM(record, 0) == NULL || PyTuple_GET_ITEM(record, 5) == NULL
            || PyDict_SetItem(bound.in_flight, req, record) < 0)
            goto error;
    }

    peer = REQUEST_ATTRIBUTE(req, s_peer_addr, peer_addr);
    if (peer == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            goto error;
        PyErr_Clear();
        peer = Py_NewRef(Py_None);
    }
    if (PyTuple_CheckExact(peer) && PyTuple_GET_SIZE(peer) >= 2) {
        /* (host, port), or IPv6's (host, port, flowinfo, scope_id) */
        PyObject *host = PyTuple_GET_ITEM(peer, 0);
        if (!PyUnicode_Check(host)) {
            PyErr_Format(PyExc_TypeError, "peer host %R is not a str", host);
            goto error;
        }
        if ((host_data = PyUnicode_AsUTF8AndSize(host, &host_length)) == NULL)
            goto error;
        port = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(peer, 1));
        if (port == (unsigned long)-1 && PyErr_Occurred())
            goto error;
        if (port > 0xFFFF) {
            PyErr_Format(PyExc_OverflowError, "peer port %lu out of range", port);
            goto error;
        }
    }
    else {
        peer_text = PyObject_CallOneArg(describe_peer, peer);
        if (peer_text == NULL)
            goto error;
        if (!PyBytes_Check(peer_text)) {
            PyErr_SetString(PyExc_TypeError, "describe_peer returned no bytes");
            goto error;
        }
        host_data = PyBytes_AS_STRING(peer_text);
        host_length = PyBytes_GET_SIZE(peer_text);
    }
    if ((path_data = utf8_of(shown, &path_length, &path_bytes)) == NULL)
        goto error;
    if (PyLong_CheckExact(current)) {
        thread = PyLong_AsUnsignedLongLong(current);
        if (thread == (unsigned long long)-1 && PyErr_Occurred())
            goto error;
    }
    else {
        thread = (unsigned long long)(uintptr_t)current; /* id() of a greenlet */
    }

    if (entry < 0 || entry + ENTRY_SIZE > bound.view.len) {
        PyErr_Format(PyExc_IndexError, "entry offset %zd outside the scoreboard", entry);
        goto error;
    }
    {
        char *at = (char *)bound.view.buf + entry;
        Py_ssize_t method_length = PyUnicode_GET_LENGTH(method);
        /* The entry is free (its in-use byte 0) while its fields are filled in; setting that one byte after a
         * release fence publishes it in one store, so a reader in another process never sees a half-written
         * request marked in use. */
        memset(at, 0, ENTRY_SIZE);
        memcpy(at + ENTRY_START, &now, 8);
        memcpy(at + ENTRY_THREAD, &thread, 8);
        put_text(at + ENTRY_METHOD, METHOD_WIDTH, (const char *)PyUnicode_DATA(method), method_length);
        put_text(at + ENTRY_HOST, HOST_WIDTH, host_data, host_length);
        put_u16(at + ENTRY_PORT, port);
        put_text(at + ENTRY_PATH, PATH_WIDTH, path_data, path_length);
        __atomic_thread_fence(__ATOMIC_RELEASE);
        at[0] = 1;
    }

    if (bound.atoms && Py_TYPE(req) != &RecordingType && log_atoms(req) < 0)
        goto error; /* (no gunicorn access log reads an ASGI request's headers) */
    goto done;

error:
    report_error("pre_request");
done:
    Py_XDECREF(path);
    Py_XDECREF(query);
    Py_XDECREF(method);
    Py_XDECREF(peer);
    Py_XDECREF(shown);
    Py_XDECREF(current);
    Py_XDECREF(entry_number);
    Py_XDECREF(record);
    Py_XDECREF(peer_text);
    Py_XDECREF(path_bytes);
    Py_RETURN_NONE;
}

/* environ.get(key) or None, for a dict or anything with .get() */
static PyObject *
lookup(PyObject *environ, PyObject *key)
{
    if (PyDict_CheckExact(environ)) {
        PyObject *value = PyDict_GetItemWithError(environ, key);
        return value == NULL ? (PyErr_Occurred() ? NULL : Py_NewRef(Py_None)) : Py_NewRef(value);
    }
    return PyObject_CallMethod(environ, "get", "O", key);
}

/* recorder.client_closed without a Python call: the exception gunicorn's write raised, still in flight in its
 * finally, else (for a request of at least recorder.HANG_UP_CHECK_AFTER) the connection's TCP state. Sets *closed to
 * RECORD_CLIENT_CLOSED or 0; -1 on a Python error. */
static int
client_closed(PyObject *req, PyObject *resp, double duration, int *closed)
{
    PyObject *type, *value, *traceback, *peer, *sock;
    unsigned char info[TCP_INFO_BYTES];
    socklen_t length = sizeof info;
    uint32_t unacked;
    int fd, matches;

    *closed = 0;
    if (Py_TYPE(resp) == &RecordingType)
        return 0; /* no socket: ASGI, where an exception in flight is the application's own */
    PyErr_GetExcInfo(&type, &value, &traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    if (value != NULL && value != Py_None) { /* None: nothing in flight, and isinstance(None, ...) is slow */
        matches = PyObject_IsInstance(value, hung_up);
        Py_DECREF(value);
        if (matches < 0)
            return -1;
        if (matches) {
            /* the server's failed write, where the response has a socket to write to */
            sock = PyObject_GetAttr(resp, s_sock);
            if (sock == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                    return -1;
                PyErr_Clear();
            }
            else if (sock != Py_None)
                *closed = RECORD_CLIENT_CLOSED;
            Py_XDECREF(sock);
            return 0;
        }
    }
    else {
        Py_XDECREF(value);
    }
    if (duration < hang_up_check_after)
        return 0;
    /* only a TCP peer (an address tuple) has a TCP state to ask */
    peer = PyObject_GetAttr(req, s_peer_addr);
    if (peer == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    matches = PyTuple_CheckExact(peer);
    Py_DECREF(peer);
    if (!matches)
        return 0;
    sock = PyObject_GetAttr(resp, s_sock);
    if (sock == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    fd = sock == Py_None ? -1 : PyObject_AsFileDescriptor(sock);
    Py_DECREF(sock);
    if (fd < 0) {
        PyErr_Clear(); /* no socket, or a closed one: nothing to ask, as the Python hook's except says */
        return 0;
    }
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &length) < 0 || length < TCP_INFO_BYTES)
        return 0; /* not TCP: a unix socket's closed peer fails the write instead */
    memcpy(&unacked, info + 24, 4);
    if (info[0] == STATE_CLOSE || (info[0] == STATE_CLOSE_WAIT && unacked))
        *closed = RECORD_CLIENT_CLOSED;
    return 0;
}

/* in_flight.pop(req): 1 and a new reference in *record, 0 when req is not there, -1 on error. One lookup where
 * a get and a del would be two (worker_instructions.py --cache-sim: those cost more instructions and more
 * instruction-cache misses). */
static int
pop_in_flight(PyObject *req, PyObject **record)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyDict_Pop(bound.in_flight, req, record);
#else
    *record = _PyDict_Pop(bound.in_flight, req, not_in_flight);
    if (*record == NULL)
        return -1;
    if (*record == not_in_flight) {
        Py_CLEAR(*record);
        return 0;
    }
    return 1;
#endif
}

/* The request's in-flight record, taken: a Recording from its entry's place in _entry_requests (the list's
 * reference becomes ours), anything else from in_flight. 1, 0 when it is in neither, -1 on error. */
static int
take_in_flight(PyObject *req, PyObject **record)
{
    if (Py_TYPE(req) == &RecordingType) {
        Py_ssize_t index = ((Recording *)req)->entry_index;
        if (index >= 0 && index < PyList_GET_SIZE(bound.entry_requests)) {
            PyObject **items = ((PyListObject *)bound.entry_requests)->ob_item;
            if (items[index] == req) {
                *record = req;
                items[index] = Py_NewRef(Py_None);
                return 1;
            }
        }
    }
    return pop_in_flight(req, record);
}

/* kind (a str) == text, a NUL-terminated ASCII string of `length` bytes: told apart by length first, so a
 * message type or a method costs one comparison. */
static int
is_kind(PyObject *kind, const char *text, Py_ssize_t length)
{
#if PY_VERSION_HEX < 0x030C0000
    if (!PyUnicode_IS_READY(kind))
        return PyUnicode_CompareWithASCIIString(kind, text) == 0;
#endif
    return PyUnicode_GET_LENGTH(kind) == length && PyUnicode_IS_ASCII(kind)
           && memcmp(PyUnicode_DATA(kind), text, (size_t)length) == 0;
}

#define IS_KIND(kind, literal) is_kind(kind, literal, (Py_ssize_t)(sizeof literal - 1))

/* method_index.get(method, other_method), -1 with an exception on error. */
static long
method_number_of(PyObject *method)
{
    PyObject *number;
    if (PyUnicode_CheckExact(method)) {
        int index;
        for (index = 0; index < known_method_count; index++) {
            if (is_kind(method, known_methods[index].text, known_methods[index].length))
                return known_methods[index].number;
        }
        if (known_methods_complete)
            return other_method;
    }
    number = PyDict_GetItemWithError(method_index, method);
    if (number == NULL) {
        if (PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError))
                return -1;
            PyErr_Clear(); /* an unhashable method: "other", as .get() with a default would not manage */
        }
        return other_method;
    }
    return PyLong_AsLong(number);
}

/* post_request's work; `end` NULL: gunicorn's hook, reading the environ in args[2]; else the layer's request. */
static PyObject *
finish_request(PyObject *const *args, Py_ssize_t nargs, const AsgiEnd *end)
{
    PyObject *recorder, *req, *environ, *resp, *started = NULL, *stamp = NULL, *status_object = NULL, *key = NULL,
        *method = NULL, *connections = NULL, *lock = NULL, *result, *built = NULL, *entry_number = NULL,
        *record_method = NULL, *record_path = NULL;
    double now, start, cpu_start, queue = Py_NAN, duration, cpu = Py_NAN;
    long status, route = 0, method_number;
    int closed;
    unsigned long long head, conns = 0;
    Py_ssize_t entry;
    int environ_given;

    if (!begin("post_request", 4, python_post_request, args, nargs, end, &recorder, &result))
        return result;
    req = args[1];
    environ = args[2];
    resp = args[3];
    if (bound.lock != NULL) {
        /* Route numbers, the overflow count and the ring are handed out under it (see RequestRecorder). */
        lock = Py_NewRef(bound.lock);
        result = PyObject_CallMethodNoArgs(lock, s_acquire);
        if (result == NULL) {
            Py_CLEAR(lock);
            goto error;
        }
        Py_DECREF(result);
    }
    now = clock_seconds(CLOCK_MONOTONIC);

    switch (take_in_flight(req, &started)) {
    case -1:
        goto error;
    case 0:
        goto done; /* not recorded: an excluded path, or pre_request never ran for it */
    }
    if (started == req && Py_TYPE(req) == &RecordingType && ((Recording *)req)->entry_number != NULL) {
        Recording *recording = (Recording *)req;
        start = recording->start;
        cpu_start = recording->cpu_start;
        entry_number = Py_NewRef(recording->entry_number);
        record_method = Py_NewRef(recording->method);
        record_path = Py_NewRef(recording->shown);
        /* the fields stay as they were, as a tuple would: the watchdog may be reading its copy of in_flight */
    }
    else if (PyTuple_CheckExact(started) && PyTuple_GET_SIZE(started) == 6) {
        start = PyFloat_AsDouble(PyTuple_GET_ITEM(started, 0));
        if ((cpu_start = PyFloat_AsDouble(PyTuple_GET_ITEM(started, 5))) == -1.0 && PyErr_Occurred())
            goto error;
        entry_number = Py_NewRef(PyTuple_GET_ITEM(started, 1));
        record_method = Py_NewRef(PyTuple_GET_ITEM(started, 3));
        record_path = Py_NewRef(PyTuple_GET_ITEM(started, 4));
    }
    else {
        PyErr_SetString(PyExc_TypeError, "in_flight holds something that is not a request record");
        goto error;
    }
    entry = PyLong_AsSsize_t(entry_number);
    if (PyErr_Occurred())
        goto error;
    if (bound.thread_cpu)
        cpu = clock_seconds(CLOCK_THREAD_CPUTIME_ID) - cpu_start;
    environ_given = end != NULL || (environ == Py_None ? 0 : PyObject_IsTrue(environ));
    if (environ_given < 0)
        goto error;

    if (bound.queue) {
        int given;
        /* Looked up here, not in pre_request: the environ has the headers hashed already. ASGI workers pass
         * no environ when there is no access log: then the request's own headers are scanned. */
        if (end != NULL) {
            stamp = Py_NewRef(end->stamp != NULL ? end->stamp : Py_None);
        }
        else if (environ_given) {
            if ((stamp = lookup(environ, s_request_start_key)) == NULL || (given = PyObject_IsTrue(stamp)) < 0)
                goto error;
            if (!given)
                Py_SETREF(stamp, lookup(environ, s_queue_start_key));
        }
        else {
            PyObject *headers = PyObject_GetAttr(req, s_headers);
            if (headers == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                    goto error;
                PyErr_Clear();
                headers = PyTuple_New(0);
                if (headers == NULL)
                    goto error;
            }
            stamp = PyObject_CallOneArg(queue_header, headers);
            Py_DECREF(headers);
        }
        if (stamp == NULL || (given = PyObject_IsTrue(stamp)) < 0)
            goto error;
        if (given && queue_seconds(stamp, clock_seconds(CLOCK_REALTIME) - (now - start), &queue) < 0)
            goto error;
    }

    status_object = REQUEST_ATTRIBUTE(resp, s_status_code, status_code); /* gunicorn's WSGI Response parses it once */
    if (status_object == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            goto error;
        PyErr_Clear();
    }
    if (status_object == NULL || !PyLong_CheckExact(status_object)) {
        Py_XSETREF(status_object, PyObject_CallOneArg(parse_status, resp));
        if (status_object == NULL)
            goto error;
    }
    status = PyLong_AsLong(status_object);
    if (status == -1 && PyErr_Occurred())
        goto error;
    if (status < 0 || status > 0xFFFF) {
        PyErr_Format(PyExc_OverflowError, "status %ld does not fit the ring record", status);
        goto error;
    }

    if (bound.routes) {
        PyObject *known = NULL;
        if (environ_given && bound.resolves_by_key) {
            if ((key = end != NULL ? Py_NewRef(end->route) : lookup(environ, s_route_key)) == NULL)
                goto error;
            if (key == bound.last_route_key)
                known = bound.last_route_id;
            else if (PyUnicode_CheckExact(key)) {
                known = PyDict_GetItemWithError(bound.route_ids, key);
                if (known == NULL && PyErr_Occurred())
                    goto error;
                if (known != NULL) {
                    Py_XSETREF(bound.last_route_key, Py_NewRef(key));
                    Py_XSETREF(bound.last_route_id, Py_NewRef(known));
                }
            }
        }
        if (known == NULL) {
            /* a route not numbered yet, or a route_resolver: the recorder reads an environ (the layer's is built
             * only now) */
            PyObject *number;
            if (end != NULL && (environ = built = asgi_environ(end)) == NULL)
                goto error;
            number = PyObject_CallMethodOneArg(recorder, s_route_number, environ);
            if (number == NULL)
                goto error;
            route = PyLong_AsLong(number);
            Py_DECREF(number);
        }
        else {
            route = PyLong_AsLong(known);
        }
        if (route == -1 && PyErr_Occurred())
            goto error;
    }

    if ((method = REQUEST_ATTRIBUTE(req, s_method, method)) == NULL)
        goto error;
    if ((method_number = method_number_of(method)) == -1 && PyErr_Occurred())
        goto error;
    if (bound.request_worker != Py_None) {
        if ((connections = PyObject_GetAttr(bound.request_worker, s_nr_conns)) == NULL)
            goto error;
        conns = PyLong_AsUnsignedLongLong(connections);
        if (conns == (unsigned long long)-1 && PyErr_Occurred())
            goto error;
        if (conns > 0xFFFFFFFFULL) {
            PyErr_Format(PyExc_OverflowError, "nr_conns %llu out of range", conns);
            goto error;
        }
    }

    if (client_closed(req, resp, now - start, &closed) < 0)
        goto error;
    if (closed) {
        /* rare: the request is named in the log when it was slow (before the ring is read, like the Python
         * hook, so no Python code runs between reading the head and publishing the next one) */
        PyObject *duration_object = PyFloat_FromDouble(now - start);
        if (duration_object == NULL)
            goto error;
        result = PyObject_CallMethodObjArgs(recorder, s_client_gone, record_method, record_path, duration_object,
                                            NULL);
        Py_DECREF(duration_object);
        if (result == NULL)
            goto error;
        Py_DECREF(result);
    }

    if (bound.head_offset + 12 > bound.view.len || bound.flags_offset >= bound.view.len
        || (entry >= 0 && entry + ENTRY_SIZE > bound.view.len)) {
        PyErr_SetString(PyExc_IndexError, "the recorder's offsets are outside the scoreboard");
        goto error;
    }
    {
        char *buf = (char *)bound.view.buf;
        uint32_t conns32 = (uint32_t)conns;
        Py_ssize_t at;
        memcpy(&head, buf + bound.head_offset, 8);
        at = bound.ring_offset + (Py_ssize_t)(head & bound.mask) * RING_SIZE;
        if (at + RING_SIZE > bound.view.len) {
            PyErr_SetString(PyExc_IndexError, "ring record outside the scoreboard");
            goto error;
        }
        duration = now - start;
        memset(buf + at, 0, RING_SIZE);
        memcpy(buf + at, &duration, 8);
        memcpy(buf + at + 8, &queue, 8);
        put_u16(buf + at + 16, (unsigned long)status);
        put_u16(buf + at + 18, (unsigned long)method_number);
        put_u16(buf + at + 20, (unsigned long)route);
        put_u16(buf + at + 22, (unsigned long)closed);
        memcpy(buf + at + 24, &cpu, 8);
        head += 1;
        /* Publishing the head after the record is what makes the record visible to the master. The head is
         * one aligned 8-byte store (the memcpy compiles to a single mov), never zero-filled first as
         * struct.pack_into does, so the master never reads a torn head; the ring record above is read only
         * once this head passes it. */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy(buf + bound.head_offset, &head, 8);
        if (bound.request_worker != Py_None)
            memcpy(buf + bound.head_offset + 8, &conns32, 4);
        if (entry >= 0) {
            if (buf[bound.flags_offset] & DYING) {
                /* a signal handler cut the request short: keep it visible for the master's report, marked
                 * counted (ENTRY_COUNTED in _scoreboard) so the master does not count it again */
                buf[entry] = 2;
                goto done;
            }
            buf[entry] = 0;
        }
    }
    if (entry >= 0) {
        if (PyList_Append(bound.free_entries, entry_number) < 0)
            goto error;
    }
    else {
        result = PyObject_CallMethodOneArg(recorder, s_add_overflow, minus_one);
        if (result == NULL)
            goto error;
        Py_DECREF(result);
    }
    goto done;

error:
    report_error("post_request");
done:
    Py_XDECREF(started);
    Py_XDECREF(entry_number);
    Py_XDECREF(record_method);
    Py_XDECREF(record_path);
    Py_XDECREF(stamp);
    Py_XDECREF(status_object);
    Py_XDECREF(key);
    Py_XDECREF(method);
    Py_XDECREF(connections);
    Py_XDECREF(built);
    if (lock != NULL) {
        result = PyObject_CallMethodNoArgs(lock, s_release);
        if (result == NULL)
            report_error("post_request");
        Py_XDECREF(result);
        Py_DECREF(lock);
    }
    Py_RETURN_NONE;
}

static PyObject *
post_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return finish_request(args, nargs, NULL);
}

/* ------------------------------------------------------------------------------------------------------------
 * The recording ASGI layer's per-request work (gunicorn_insight/_worker/asgi.py), compiled.
 *
 * asgi.py stays the definition: with the compiled hooks, RecordingApp hands each HTTP request to asgi_start,
 * which makes one Recording: the stand-in for gunicorn's request and response that the two hooks above read
 * (members, not a Python object's attributes), and the send callable the application gets. Calling it looks at
 * the message and returns what the server's send returns, so no coroutine is made per request or per message
 * beyond the server's own. The hooks are called as C functions: the same code, so the same bytes.
 * Anything unusual (a scope that is not a dict, headers that are not bytes pairs, a route inside a mount) is
 * handed to asgi.py's own functions (queue_stamp, route_template), bound by bind_asgi.
 */

static PyObject *asgi_route_template, *asgi_queue_stamp, *running_loop, *task_of_loop, *thread_ident, *sender;
static PyObject *s_type, *s_status, *s_more_body, *s_query_string, *s_client, *s_root_path, *s_route,
    *s_path_format, *s_asgi_scope, *s_empty, *s_get, *five_hundred;

/* mapping.get(key, fallback): a new reference, NULL with an exception */
static PyObject *
get_or(PyObject *mapping, PyObject *key, PyObject *fallback)
{
    if (PyDict_CheckExact(mapping)) {
        PyObject *value = PyDict_GetItemWithError(mapping, key);
        if (value != NULL)
            return Py_NewRef(value);
        return PyErr_Occurred() ? NULL : Py_NewRef(fallback);
    }
    return PyObject_CallMethodObjArgs(mapping, s_get, key, fallback, NULL);
}

/* mapping.get(key) or fallback */
static PyObject *
get_truthy_or(PyObject *mapping, PyObject *key, PyObject *fallback)
{
    PyObject *value = get_or(mapping, key, Py_None);
    int truth;
    if (value == NULL)
        return NULL;
    /* a scope's method, path and query: their length, without the generic truth test's calls */
    if (PyUnicode_CheckExact(value))
        truth = PyUnicode_GET_LENGTH(value) != 0;
    else if (PyBytes_CheckExact(value))
        truth = PyBytes_GET_SIZE(value) != 0;
    else
        truth = PyObject_IsTrue(value);
    if (truth < 0) {
        Py_DECREF(value);
        return NULL;
    }
    if (!truth)
        Py_SETREF(value, Py_NewRef(fallback));
    return value;
}

/* queue_stamp(scope) of asgi.py: (environ key, header value) of X-Request-Start, else X-Queue-Start; 0: none,
 * 1: found (new references), -1: an exception. */
static int
asgi_stamp(PyObject *scope, PyObject **key, PyObject **value)
{
    PyObject *headers, *found_value = NULL, *found_key = NULL, *stamp = NULL;
    Py_ssize_t count, n;
    int result = 0;
    *key = *value = NULL;
    if ((headers = get_or(scope, s_headers, Py_None)) == NULL)
        return -1;
    if (!PyList_CheckExact(headers) && !PyTuple_CheckExact(headers)) {
        if (headers == Py_None) {
            Py_DECREF(headers);
            return 0;
        }
        goto python;
    }
    count = PySequence_Fast_GET_SIZE(headers);
    for (n = 0; n < count; n++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(headers, n), *name, *text;
        const char *data;
        Py_ssize_t length;
        int request_start;
        if (!PyTuple_CheckExact(pair) && !PyList_CheckExact(pair))
            goto python;
        if (PySequence_Fast_GET_SIZE(pair) != 2)
            goto python;
        name = PySequence_Fast_GET_ITEM(pair, 0);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(PySequence_Fast_GET_ITEM(pair, 1)))
            goto python;
        data = PyBytes_AS_STRING(name);
        length = PyBytes_GET_SIZE(name);
        if (length == 15 && strncasecmp(data, "x-request-start", 15) == 0)
            request_start = 1;
        else if (length == 13 && strncasecmp(data, "x-queue-start", 13) == 0)
            request_start = 0;
        else
            continue;
        if (!request_start && found_key != NULL)
            continue; /* the first X-Queue-Start counts, unless an X-Request-Start comes */
        text = PySequence_Fast_GET_ITEM(pair, 1);
        text = PyUnicode_DecodeLatin1(PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text), NULL);
        if (text == NULL)
            goto error;
        Py_XSETREF(found_value, text);
        Py_XSETREF(found_key, Py_NewRef(request_start ? s_request_start_key : s_queue_start_key));
        if (request_start)
            break;
    }
    Py_DECREF(headers);
    *key = found_key;
    *value = found_value;
    return found_key != NULL;

python:
    /* not the list of (bytes, bytes) pairs an ASGI server gives: the Python definition reads it */
    Py_CLEAR(found_key);
    Py_CLEAR(found_value);
    if ((stamp = PyObject_CallOneArg(asgi_queue_stamp, scope)) == NULL)
        goto error;
    if (stamp != Py_None) {
        PyObject *name;
        if (!PyTuple_CheckExact(stamp) || PyTuple_GET_SIZE(stamp) != 2) {
            PyErr_SetString(PyExc_TypeError, "queue_stamp returned no (name, value) pair");
            goto error;
        }
        name = PyTuple_GET_ITEM(stamp, 0);
        if (!PyUnicode_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "queue_stamp returned a name that is not a str");
            goto error;
        }
        *key = Py_NewRef(PyUnicode_CompareWithASCIIString(name, "X-REQUEST-START") == 0 ? s_request_start_key
                                                                                          : s_queue_start_key);
        *value = Py_NewRef(PyTuple_GET_ITEM(stamp, 1));
        result = 1;
    }
    Py_DECREF(stamp);
    Py_DECREF(headers);
    return result;
error:
    Py_XDECREF(stamp);
    Py_XDECREF(found_key);
    Py_XDECREF(found_value);
    Py_DECREF(headers);
    return -1;
}

/* The route asgi_route last read a path_format from, and that format. An application's routes are made once, at
 * startup, so the next request's route is usually the same object, and its format is read from here instead of
 * through the attribute lookup (which walks the route's type). A strong reference: the address stays this
 * route's. */
static PyObject *last_route, *last_route_path;

/* route_template(scope, root_path) of asgi.py: a new reference to the template or None; NULL: an exception.
 * Here only the usual case: a route whose path_format is a str, outside any mount. */
static PyObject *
asgi_route(Recording *self)
{
    PyObject *route, *path = NULL, *mounted = NULL;
    int same;
    if (!PyDict_CheckExact(self->scope))
        goto python;
    route = PyDict_GetItemWithError(self->scope, s_route);
    if (route == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    if (route == Py_None)
        return Py_NewRef(Py_None);
    if (route == last_route)
        path = Py_NewRef(last_route_path);
    else {
        path = PyObject_GetAttr(route, s_path_format); /* Starlette's routes have it */
        if (path == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                return NULL;
            PyErr_Clear();
            goto python;
        }
        if (!PyUnicode_CheckExact(path) || PyUnicode_GET_LENGTH(path) == 0)
            goto python;
        Py_XSETREF(last_route, Py_NewRef(route));
        Py_XSETREF(last_route_path, Py_NewRef(path));
    }
    mounted = PyDict_GetItemWithError(self->scope, s_root_path);
    if (mounted == NULL) {
        if (PyErr_Occurred())
            goto error;
        return path;
    }
    same = mounted == self->root_path ? 1 : PyObject_RichCompareBool(mounted, self->root_path, Py_EQ);
    if (same < 0)
        goto error;
    if (same)
        return path;
python:
    Py_XDECREF(path);
    return PyObject_CallFunctionObjArgs(asgi_route_template, self->scope, self->root_path, NULL);
error:
    Py_DECREF(path);
    return NULL;
}

/* The environ post_request would get for this request (asgi.py's request_environ): built only when the recorder
 * reads one, for a route it has not numbered yet or a route_resolver. */
static PyObject *
asgi_environ(const AsgiEnd *end)
{
    PyObject *environ = PyDict_New();
    if (environ == NULL)
        return NULL;
    /* always there: an empty environ would read as none given, and a route_resolver for ASGI reads it */
    if (PyDict_SetItem(environ, s_asgi_scope, end->scope) < 0
        || (end->stamp != NULL && PyDict_SetItem(environ, end->stamp_key, end->stamp) < 0)
        || (end->route != Py_None && PyDict_SetItem(environ, s_route_key, end->route) < 0)) {
        Py_DECREF(environ);
        return NULL;
    }
    return environ;
}

/* AsgiRequest.finish: what post_request reads from the environ, read from the scope; post_request's work done. */
static void
recording_finish(Recording *self)
{
    AsgiEnd end = {self->scope, NULL, NULL, NULL};
    PyObject *args[4];
    self->finished = 1;
    if (asgi_stamp(self->scope, &end.stamp_key, &end.stamp) < 0)
        goto error;
    if ((end.route = self->routes ? asgi_route(self) : Py_NewRef(Py_None)) == NULL)
        goto error;
    args[0] = self->worker;
    args[1] = (PyObject *)self;
    args[2] = Py_None;
    args[3] = (PyObject *)self;
    Py_XDECREF(finish_request(args, 4, &end)); /* it reports its own errors, and returns None */
    if (PyErr_Occurred())
        goto error;
    goto done;
error:
    report_error("recording an ASGI request");
done:
    Py_XDECREF(end.stamp_key);
    Py_XDECREF(end.stamp);
    Py_XDECREF(end.route);
}

/* note(recording, message): what the application's send does before the message goes out (asgi.sender): note
 * the status, record the request before the last of its response goes out; returns the server's send, which
 * the message goes to. Never raises for the message: a bug of ours is reported and the message still goes. */
static PyObject *
note(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Recording *self;
    PyObject *message, *kind = NULL;
    if (nargs != 2 || !Py_IS_TYPE(args[0], &RecordingType)) {
        PyErr_SetString(PyExc_TypeError, "note() takes a Recording and a message");
        return NULL;
    }
    self = (Recording *)args[0];
    message = args[1];
    if ((kind = get_or(message, s_type, Py_None)) == NULL)
        goto error;
    if (PyUnicode_CheckExact(kind)) {
        if (IS_KIND(kind, "http.response.start")) {
            PyObject *status = get_or(message, s_status, five_hundred);
            if (status == NULL)
                goto error;
            Py_SETREF(self->status_code, status);
        }
        else if (!self->finished
                 && (IS_KIND(kind, "http.response.body") || IS_KIND(kind, "http.response.pathsend")
                     || IS_KIND(kind, "http.response.zerocopysend"))) {
            PyObject *more = get_or(message, s_more_body, Py_False);
            int truth;
            if (more == NULL)
                goto error;
            truth = PyObject_IsTrue(more);
            Py_DECREF(more);
            if (truth < 0)
                goto error;
            if (!truth)
                recording_finish(self);
        }
    }
    goto send;
error:
    report_error("recording an ASGI request");
send:
    Py_XDECREF(kind);
    return Py_NewRef(self->send);
}

/* finish(): what the layer calls once the application has returned or failed; nothing when already recorded. */
static PyObject *
recording_finish_method(PyObject *self, PyObject *unused)
{
    if (!((Recording *)self)->finished)
        recording_finish((Recording *)self);
    Py_RETURN_NONE;
}

/* asgi_start(worker, scope, send, routes): the request's Recording, after pre_request. */
static PyObject *
asgi_start(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Recording *self;
    PyObject *scope, *query, *client, *hook_args[2];
    int routes;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "asgi_start() takes 4 positional arguments (%zd given)", nargs);
        return NULL;
    }
    if ((routes = PyObject_IsTrue(args[3])) < 0)
        return NULL;
    scope = args[1];
    self = PyObject_GC_New(Recording, &RecordingType);
    if (self == NULL)
        return NULL;
    self->worker = Py_NewRef(args[0]);
    self->scope = Py_NewRef(scope);
    self->send = Py_NewRef(args[2]);
    self->status_code = Py_NewRef(five_hundred);
    self->finished = 0;
    self->routes = (char)routes;
    self->method = self->path = self->query = self->peer_addr = self->root_path = self->no_socket = NULL;
    self->entry_number = self->current = self->shown = NULL;
    self->entry_index = -1;
    self->start = self->cpu_start = 0.0;
    PyObject_GC_Track(self);
    if ((self->method = get_truthy_or(scope, s_method, s_empty)) == NULL
        || (self->path = get_truthy_or(scope, s_path, s_empty)) == NULL
        || (self->root_path = get_or(scope, s_root_path, s_empty)) == NULL
        || (query = get_truthy_or(scope, s_query_string, s_empty)) == NULL)
        goto error;
    if (query == s_empty)
        self->query = query;
    else {
        self->query = PyBytes_CheckExact(query)
                          ? PyUnicode_DecodeLatin1(PyBytes_AS_STRING(query), PyBytes_GET_SIZE(query), NULL)
                          : PyObject_CallMethod(query, "decode", "s", "latin-1");
        Py_DECREF(query);
        if (self->query == NULL)
            goto error;
    }
    /* ASGI servers give [host, port] or (host, port); the hooks take a tuple as a TCP peer, anything else
     * (None on a unix socket) as "unix". */
    if ((client = get_truthy_or(scope, s_client, Py_None)) == NULL)
        goto error;
    if (client == Py_None || PyTuple_CheckExact(client))
        self->peer_addr = client;
    else {
        self->peer_addr = PySequence_Tuple(client);
        Py_DECREF(client);
        if (self->peer_addr == NULL)
            goto error;
    }
    hook_args[0] = self->worker;
    hook_args[1] = (PyObject *)self;
    Py_XDECREF(pre_request(NULL, hook_args, 2)); /* it reports its own errors, and returns None */
    if (PyErr_Occurred())
        goto error;
    return (PyObject *)self;
error:
    Py_DECREF(self);
    return NULL;
}

static int
recording_traverse(Recording *self, visitproc visit, void *arg)
{
    Py_VISIT(self->method);
    Py_VISIT(self->path);
    Py_VISIT(self->query);
    Py_VISIT(self->peer_addr);
    Py_VISIT(self->status_code);
    Py_VISIT(self->worker);
    Py_VISIT(self->scope);
    Py_VISIT(self->root_path);
    Py_VISIT(self->send);
    Py_VISIT(self->entry_number);
    Py_VISIT(self->current);
    Py_VISIT(self->shown);
    return 0;
}

static int
recording_clear(Recording *self)
{
    Py_CLEAR(self->method);
    Py_CLEAR(self->path);
    Py_CLEAR(self->query);
    Py_CLEAR(self->peer_addr);
    Py_CLEAR(self->status_code);
    Py_CLEAR(self->worker);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->root_path);
    Py_CLEAR(self->send);
    Py_CLEAR(self->entry_number);
    Py_CLEAR(self->current);
    Py_CLEAR(self->shown);
    return 0;
}

static void
recording_dealloc(Recording *self)
{
    PyObject_GC_UnTrack(self);
    recording_clear(self);
    PyObject_GC_Del(self);
}

/* The hooks' attribute reads, answered from the fields without the type's generic lookup (the members below
 * give the same answers to everyone else). */
static PyObject *
recording_getattro(PyObject *object, PyObject *name)
{
    Recording *self = (Recording *)object;
    PyObject *value = NULL;
    if (name == s_path)
        value = self->path;
    else if (name == s_method)
        value = self->method;
    else if (name == s_query)
        value = self->query;
    else if (name == s_peer_addr)
        value = self->peer_addr;
    else if (name == s_status_code)
        value = self->status_code;
    else if (name == s_sock)
        return Py_NewRef(Py_None);
    else
        return PyObject_GenericGetAttr(object, name);
    return Py_NewRef(value != NULL ? value : Py_None);
}

/* In flight it reads as the recorder's InFlightRequest tuple: (start, entry, current, method, path, CPU
 * clock), for the watchdog and the stacks command, which index and unpack it. */
static Py_ssize_t
recording_length(PyObject *self)
{
    return 6;
}

static PyObject *
recording_item(PyObject *object, Py_ssize_t index)
{
    Recording *self = (Recording *)object;
    PyObject *value;
    switch (index) {
    case 0:
        return PyFloat_FromDouble(self->start);
    case 1:
        value = self->entry_number;
        break;
    case 2:
        value = self->current;
        break;
    case 3:
        value = self->method;
        break;
    case 4:
        value = self->shown;
        break;
    case 5:
        return PyFloat_FromDouble(self->cpu_start);
    default:
        PyErr_SetString(PyExc_IndexError, "a request record has 6 fields");
        return NULL;
    }
    return Py_NewRef(value != NULL ? value : Py_None);
}

static PySequenceMethods recording_sequence = {
    .sq_length = recording_length,
    .sq_item = recording_item,
};

static PyMemberDef recording_members[] = {
    {"method", T_OBJECT, offsetof(Recording, method), READONLY, NULL},
    {"path", T_OBJECT, offsetof(Recording, path), READONLY, NULL},
    {"query", T_OBJECT, offsetof(Recording, query), READONLY, NULL},
    {"peer_addr", T_OBJECT, offsetof(Recording, peer_addr), READONLY, NULL},
    {"status_code", T_OBJECT, offsetof(Recording, status_code), READONLY, NULL},
    /* no socket to ask for the TCP state (post_request's client_closed): None, without raising */
    {"sock", T_OBJECT, offsetof(Recording, no_socket), READONLY, NULL},
    {NULL},
};

static PyMethodDef recording_methods[] = {
    {"finish", recording_finish_method, METH_NOARGS,
     "Record the request now, unless its response has finished already (the application returned or failed)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RecordingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "gunicorn_insight._worker._speedups.Recording",
    .tp_basicsize = sizeof(Recording),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One HTTP request through the recording ASGI layer: the request hooks' request and response (see "
              "asgi_start); the application's send is asgi.sender's function bound to it.",
    .tp_getattro = recording_getattro,
    .tp_traverse = (traverseproc)recording_traverse,
    .tp_clear = (inquiry)recording_clear,
    .tp_dealloc = (destructor)recording_dealloc,
    .tp_members = recording_members,
    .tp_methods = recording_methods,
    .tp_as_sequence = &recording_sequence,
};

/* ------------------------------------------------------------------------------------------------------------
 * The recording ASGI layer's entry, compiled: what the server calls for each request (RecordingApp.entry()).
 *
 * RecordingApp.__call__ is an `async def`: one coroutine of the layer's own per request, whose frame runs
 * around the application's and goes through every one of its suspensions. An Entry makes none: for an HTTP
 * scope it starts the Recording (asgi_start), calls the application with asgi.sender's function bound to it as
 * its send, and returns a Serving, an awaitable that hands every send and throw to the application's own
 * awaitable and finishes the Recording when that one returns, raises or is closed (RecordingApp.__call__'s
 * `finally`). Any other call (the first, which hands the running loop to the watchdog; lifespan and websocket
 * scopes; anything but three positional arguments) goes to RecordingApp.__call__ itself. Attributes are
 * RecordingApp's, which are the application's, so servers see the application through it; asked for
 * __call__, it gives RecordingApp's `async def`, which is what an ASGI server checks to tell an ASGI 3
 * application.
 */

typedef struct {
    PyObject_HEAD
    PyObject *layer;       /* the RecordingApp */
    PyObject *layer_call;  /* its bound __call__ */
    PyObject *worker, *app; /* what a request needs (RecordingApp._serving) */
    int routes;
    char delegate_next;    /* the next call goes to the layer: the first one finds the loop */
    vectorcallfunc vectorcall;
} Entry;

typedef struct {
    PyObject_HEAD
    PyObject *awaited;   /* the application's awaitable, as an iterator */
    Recording *recording;
} Serving;

static PyTypeObject EntryType, ServingType;
static PyObject *s_call_name, *s_http, *s_throw, *s_close;

/* The Recording finished, unless it is already, while the application's exception (if any) stays pending for
 * the server: recording it must neither lose nor report it. */
static void
finish_keeping_error(Recording *recording)
{
    PyObject *type, *error, *traceback;
    if (recording == NULL || recording->finished)
        return;
    PyErr_Fetch(&type, &error, &traceback);
    recording_finish(recording);
    PyErr_Restore(type, error, traceback);
}

/* One step of the application's awaitable; the Recording finished when it is done. */
static PySendResult
serving_am_send(PyObject *object, PyObject *value, PyObject **result)
{
    Serving *self = (Serving *)object;
    PySendResult status;
    if (self->awaited == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse an already awaited ASGI request");
        *result = NULL;
        return PYGEN_ERROR;
    }
    status = PyIter_Send(self->awaited, value, result);
    if (status != PYGEN_NEXT) {
        finish_keeping_error(self->recording);
        Py_CLEAR(self->awaited);
    }
    return status;
}

/* A finished step as an iterator's send() says it: the value in StopIteration. */
static PyObject *
stop_iteration(PySendResult status, PyObject *result)
{
    if (status == PYGEN_NEXT || status == PYGEN_ERROR)
        return result;
    if (result == Py_None)
        PyErr_SetNone(PyExc_StopIteration);
    else {
        PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, result);
        if (stop != NULL) {
            PyErr_SetObject(PyExc_StopIteration, stop);
            Py_DECREF(stop);
        }
    }
    Py_DECREF(result);
    return NULL;
}

static PyObject *
serving_iternext(PyObject *self)
{
    PyObject *result = NULL;
    /* sent first, then result read: C leaves the order of a call's arguments open */
    PySendResult status = serving_am_send(self, Py_None, &result);
    return stop_iteration(status, result);
}

static PyObject *
serving_send(PyObject *self, PyObject *value)
{
    PyObject *result = NULL;
    PySendResult status = serving_am_send(self, value, &result);
    return stop_iteration(status, result);
}

/* throw() and close() go to the application's awaitable (a task cancelled, a coroutine closed): whatever
 * ends it finishes the Recording; a value it yields keeps it going. */
static PyObject *
serving_forward(Serving *self, PyObject *name, PyObject *args)
{
    PyObject *method, *result;
    if (self->awaited == NULL) {
        if (name == s_close)
            Py_RETURN_NONE;
        PyErr_SetString(PyExc_RuntimeError, "cannot throw into an already awaited ASGI request");
        return NULL;
    }
    method = PyObject_GetAttr(self->awaited, name);
    if (method == NULL) {
        if (name != s_close || !PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear(); /* an iterator without close(): nothing to close but the request */
        result = Py_NewRef(Py_None);
    }
    else {
        result = PyObject_Call(method, args, NULL);
        Py_DECREF(method);
        if (result != NULL && name != s_close)
            return result; /* it yielded: still running */
    }
    finish_keeping_error(self->recording);
    Py_CLEAR(self->awaited);
    return result;
}

static PyObject *
serving_throw(PyObject *self, PyObject *args)
{
    return serving_forward((Serving *)self, s_throw, args);
}

static PyObject *
serving_close(PyObject *self, PyObject *unused)
{
    PyObject *none = PyTuple_New(0), *result;
    if (none == NULL)
        return NULL;
    result = serving_forward((Serving *)self, s_close, none);
    Py_DECREF(none);
    return result;
}

static PyObject *
serving_await(PyObject *self)
{
    return Py_NewRef(self);
}

/* Dropped before its end (never awaited, or its task destroyed): finished, as a coroutine's `finally` runs
 * when it is closed at collection. */
static void
serving_finalize(PyObject *object)
{
    Serving *self = (Serving *)object;
    PyObject *type, *error, *traceback;
    if (self->awaited == NULL)
        return;
    PyErr_Fetch(&type, &error, &traceback);
    Py_XDECREF(serving_close(object, NULL));
    if (PyErr_Occurred())
        PyErr_WriteUnraisable(object);
    PyErr_Restore(type, error, traceback);
}

static int
serving_traverse(Serving *self, visitproc visit, void *arg)
{
    Py_VISIT(self->awaited);
    Py_VISIT(self->recording);
    return 0;
}

static int
serving_clear(Serving *self)
{
    Py_CLEAR(self->awaited);
    Py_CLEAR(self->recording);
    return 0;
}

static void
serving_dealloc(Serving *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return; /* brought back to life by its finalizer */
    PyObject_GC_UnTrack(self);
    serving_clear(self);
    PyObject_GC_Del(self);
}

static PyAsyncMethods serving_async = {
    .am_await = serving_await,
    .am_send = serving_am_send,
};

/* What it awaits, under the name a coroutine gives it, for whatever walks a task's awaits (the watchdog's stacks). */
static PyMemberDef serving_members[] = {
    {"cr_await", T_OBJECT, offsetof(Serving, awaited), READONLY, NULL},
    {NULL},
};

static PyMethodDef serving_methods[] = {
    {"send", serving_send, METH_O, "Hand a value to the application's awaitable."},
    {"throw", serving_throw, METH_VARARGS, "Raise an exception inside the application's awaitable."},
    {"close", serving_close, METH_NOARGS, "Close the application's awaitable; the request is recorded."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "gunicorn_insight._worker._speedups.Serving",
    .tp_basicsize = sizeof(Serving),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One HTTP request's application call, awaited through the recording ASGI layer (see Entry).",
    .tp_as_async = &serving_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = serving_iternext,
    .tp_finalize = serving_finalize,
    .tp_traverse = (traverseproc)serving_traverse,
    .tp_clear = (inquiry)serving_clear,
    .tp_dealloc = (destructor)serving_dealloc,
    .tp_members = serving_members,
    .tp_methods = serving_methods,
};

/* The iterator `await` takes from an awaitable: a coroutine itself, else what its __await__ gives. */
static PyObject *
awaitable_iterator(PyObject *awaitable)
{
    PyTypeObject *type = Py_TYPE(awaitable);
    PyObject *iterator;
    if (PyCoro_CheckExact(awaitable))
        return Py_NewRef(awaitable);
    if (type->tp_as_async == NULL || type->tp_as_async->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "the ASGI application returned %.100s, which cannot be awaited",
                     type->tp_name);
        return NULL;
    }
    iterator = type->tp_as_async->am_await(awaitable);
    if (iterator != NULL && !PyIter_Check(iterator)) {
        PyErr_Format(PyExc_TypeError, "__await__() of %.100s returned a non-iterator", type->tp_name);
        Py_CLEAR(iterator);
    }
    return iterator;
}

static PyObject *
entry_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Entry *self = (Entry *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *scope, *kind, *start_args[4], *app_args[3], *awaitable, *iterator;
    Recording *recording;
    Serving *serving;
    int http;
    if (self->delegate_next || sender == NULL || nargs != 3 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0))
        goto layer;
    scope = args[0];
    if (!PyDict_CheckExact(scope))
        goto layer;
    kind = PyDict_GetItemWithError(scope, s_type);
    if (kind == NULL) {
        if (PyErr_Occurred())
            return NULL;
        goto layer;
    }
    http = kind == s_http || (PyUnicode_CheckExact(kind) && PyUnicode_Compare(kind, s_http) == 0);
    if (!http)
        goto layer;
    start_args[0] = self->worker;
    start_args[1] = scope;
    start_args[2] = args[2];
    start_args[3] = self->routes ? Py_True : Py_False;
    recording = (Recording *)asgi_start(NULL, start_args, 4);
    if (recording == NULL) {
        report_error("recording an ASGI request"); /* our bug must not cost the application its request */
        return PyObject_Vectorcall(self->app, args, 3, NULL);
    }
    app_args[0] = scope;
    app_args[1] = args[1];
    app_args[2] = PyMethod_New(sender, (PyObject *)recording);
    if (app_args[2] == NULL) {
        Py_DECREF(recording);
        return NULL;
    }
    awaitable = PyObject_Vectorcall(self->app, app_args, 3, NULL);
    Py_DECREF(app_args[2]);
    iterator = awaitable == NULL ? NULL : awaitable_iterator(awaitable);
    Py_XDECREF(awaitable);
    if (iterator == NULL) {
        finish_keeping_error(recording);
        Py_DECREF(recording);
        return NULL;
    }
    serving = PyObject_GC_New(Serving, &ServingType);
    if (serving == NULL) {
        Py_DECREF(iterator);
        Py_DECREF(recording);
        return NULL;
    }
    serving->awaited = iterator;
    serving->recording = recording;
    PyObject_GC_Track(serving);
    return (PyObject *)serving;
layer:
    self->delegate_next = 0;
    return PyObject_Vectorcall(self->layer_call, args, nargsf, kwnames);
}

/* Entry(layer, worker, app, routes): see above. */
static PyObject *
entry_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *layer, *worker, *app;
    int routes;
    Entry *self;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) {
        PyErr_SetString(PyExc_TypeError, "Entry() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOp:Entry", &layer, &worker, &app, &routes))
        return NULL;
    self = PyObject_GC_New(Entry, type);
    if (self == NULL)
        return NULL;
    self->layer = Py_NewRef(layer);
    self->worker = Py_NewRef(worker);
    self->app = Py_NewRef(app);
    self->routes = routes;
    self->delegate_next = 1;
    self->vectorcall = entry_call;
    self->layer_call = PyObject_GetAttr(layer, s_call_name);
    PyObject_GC_Track(self);
    if (self->layer_call == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* The layer's attributes (so the application's), and the layer's own __call__ when asked for it. */
static PyObject *
entry_getattro(PyObject *object, PyObject *name)
{
    Entry *self = (Entry *)object;
    if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "__class__") != 0
        && PyUnicode_CompareWithASCIIString(name, "__dict__") != 0)
        return PyObject_GetAttr(self->layer, name);
    return PyObject_GenericGetAttr(object, name);
}

static int
entry_traverse(Entry *self, visitproc visit, void *arg)
{
    Py_VISIT(self->layer);
    Py_VISIT(self->layer_call);
    Py_VISIT(self->worker);
    Py_VISIT(self->app);
    return 0;
}

static int
entry_clear(Entry *self)
{
    Py_CLEAR(self->layer);
    Py_CLEAR(self->layer_call);
    Py_CLEAR(self->worker);
    Py_CLEAR(self->app);
    return 0;
}

static void
entry_dealloc(Entry *self)
{
    PyObject_GC_UnTrack(self);
    entry_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "gunicorn_insight._worker._speedups.Entry",
    .tp_basicsize = sizeof(Entry),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Entry(layer, worker, app, routes): the recording ASGI layer's per-request path in C; the server "
              "calls it for each request (see RecordingApp.entry).",
    .tp_new = entry_new,
    .tp_vectorcall_offset = offsetof(Entry, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = entry_getattro,
    .tp_traverse = (traverseproc)entry_traverse,
    .tp_clear = (inquiry)entry_clear,
    .tp_dealloc = (destructor)entry_dealloc,
};

/* The loop current_task() last found running, and the thread it ran in. Asking for the running loop costs a
 * getpid() system call (asyncio checks for a fork), once per request; the loop a thread found keeps serving
 * it, so it is asked only when that loop has no task running now (it stopped, or another thread asks). */
static PyObject *known_loop;
static unsigned long known_loop_thread;

/* In a forked child the loop is the parent's: forgotten (its reference stays, harmlessly, in the child). */
static void
forget_known_loop(void)
{
    known_loop = NULL;
}

/* The task running on loop now, a new reference; NULL with no exception when there is none. */
static PyObject *
task_running_on(PyObject *loop)
{
    PyObject *task;
    if (PyDict_CheckExact(task_of_loop))
        return Py_XNewRef(PyDict_GetItemWithError(task_of_loop, loop));
    if ((task = PyObject_CallOneArg(task_of_loop, loop)) == NULL)
        return NULL;
    if (task == Py_None)
        Py_CLEAR(task);
    return task;
}

/* current_task() of asgi.py, without a Python frame: the running loop's task, else the thread's id. */
static PyObject *
current_task(PyObject *module, PyObject *unused)
{
    PyObject *loop, *task = NULL;
    unsigned long thread = PyThread_get_thread_ident();
    if (running_loop == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "current_task() before bind_asgi()");
        return NULL;
    }
    /* A loop runs in one thread, and a thread runs one loop at a time: a task running on the loop this thread
     * found before is this thread's. */
    if (known_loop != NULL && thread == known_loop_thread) {
        if ((task = task_running_on(known_loop)) != NULL)
            return task;
        if (PyErr_Occurred())
            return NULL;
    }
    if ((loop = PyObject_CallNoArgs(running_loop)) == NULL)
        return NULL;
    if (loop != Py_None) {
        task = task_running_on(loop);
        if (task == NULL && PyErr_Occurred()) {
            Py_DECREF(loop);
            return NULL;
        }
        Py_XSETREF(known_loop, Py_NewRef(loop));
        known_loop_thread = thread;
    }
    Py_DECREF(loop);
    return task != NULL ? task : PyObject_CallNoArgs(thread_ident);
}

/* bind_asgi(route_template, queue_stamp, running_loop, task_of_loop, thread_ident, sender): asgi.py's
 * definitions, for what asgi_start leaves to them, what its current_task reads (task_of_loop: a dict, or a
 * function), and the send function an Entry binds to each Recording. */
static PyObject *
bind_asgi(PyObject *module, PyObject *args)
{
    PyObject *route_template, *queue_stamp, *loop, *tasks, *ident, *send;
    if (!PyArg_ParseTuple(args, "OOOOOO:bind_asgi", &route_template, &queue_stamp, &loop, &tasks, &ident, &send))
        return NULL;
    Py_XSETREF(sender, Py_NewRef(send));
    Py_XSETREF(asgi_route_template, Py_NewRef(route_template));
    Py_XSETREF(asgi_queue_stamp, Py_NewRef(queue_stamp));
    Py_XSETREF(running_loop, Py_NewRef(loop));
    Py_XSETREF(task_of_loop, Py_NewRef(tasks));
    Py_XSETREF(thread_ident, Py_NewRef(ident));
    Py_RETURN_NONE;
}

/* known_methods from method_index: its ASCII keys short enough for the table (with their NUL). */
static int
read_known_methods(void)
{
    Py_ssize_t position = 0;
    PyObject *key, *value;
    known_method_count = 0;
    known_methods_complete = 1;
    while (PyDict_Next(method_index, &position, &key, &value)) {
        Py_ssize_t length;
        long number;
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_CheckExact(key) && PyUnicode_READY(key) < 0)
            return -1;
#endif
        if (!PyUnicode_CheckExact(key) || !PyLong_CheckExact(value) || !PyUnicode_IS_ASCII(key)
            || (length = PyUnicode_GET_LENGTH(key)) >= (Py_ssize_t)sizeof known_methods[0].text
            || known_method_count == KNOWN_METHODS) {
            known_methods_complete = 0;
            continue;
        }
        if ((number = PyLong_AsLong(value)) == -1 && PyErr_Occurred())
            return -1;
        memcpy(known_methods[known_method_count].text, PyUnicode_DATA(key), (size_t)length);
        known_methods[known_method_count].text[length] = '\0';
        known_methods[known_method_count].length = length;
        known_methods[known_method_count].number = number;
        known_method_count++;
    }
    return 0;
}

/* bind(globals, pre_request, post_request, report, describe_peer, parse_status, parse_request_start,
 *      queue_header, method_index, other_method, route_key, request_start_key, queue_start_key,
 *      hang_up_check_after, layouts) */
static PyObject *
bind_hooks(PyObject *module, PyObject *args)
{
    PyObject *globals, *pre, *post, *reporter, *peer, *status, *queue, *scan, *methods, *route_key,
        *request_start, *queue_start, *layouts, *expected;
    long other;
    double check_after;
    int same;
    if (!PyArg_ParseTuple(args, "O!OOOOOOOO!lUUUdO:bind", &PyDict_Type, &globals, &pre, &post, &reporter, &peer,
                          &status, &queue, &scan, &PyDict_Type, &methods, &other, &route_key, &request_start,
                          &queue_start, &check_after, &layouts))
        return NULL;
    expected = Py_BuildValue("(sssi)", "<B7xdQ8s46sH176s", "<ddHHHHd", "<QI", DYING);
    if (expected == NULL)
        return NULL;
    same = PyObject_RichCompareBool(layouts, expected, Py_EQ);
    Py_DECREF(expected);
    if (same < 0)
        return NULL;
    if (!same) {
        PyErr_Format(PyExc_ImportError, "scoreboard layout %R is not the one _speedups.c was written for", layouts);
        return NULL;
    }
    clear_bound();
    Py_XSETREF(worker_globals, Py_NewRef(globals));
    Py_XSETREF(python_pre_request, Py_NewRef(pre));
    Py_XSETREF(python_post_request, Py_NewRef(post));
    Py_XSETREF(report, Py_NewRef(reporter));
    Py_XSETREF(describe_peer, Py_NewRef(peer));
    Py_XSETREF(parse_status, Py_NewRef(status));
    Py_XSETREF(parse_request_start, Py_NewRef(queue));
    Py_XSETREF(queue_header, Py_NewRef(scan));
    Py_XSETREF(method_index, Py_NewRef(methods));
    if (read_known_methods() < 0)
        return NULL;
    Py_XSETREF(s_route_key, Py_NewRef(route_key));
    Py_XSETREF(s_request_start_key, Py_NewRef(request_start));
    Py_XSETREF(s_queue_start_key, Py_NewRef(queue_start));
    other_method = other;
    hang_up_check_after = check_after;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pre_request", (PyCFunction)(void (*)(void))pre_request, METH_FASTCALL,
     "pre_request($module, worker, req, /)\n--\n\n"
     "gunicorn's pre_request hook: publish the request in this worker's scoreboard entry."},
    {"post_request", (PyCFunction)(void (*)(void))post_request, METH_FASTCALL,
     "post_request($module, worker, req, environ, resp, /)\n--\n\n"
     "gunicorn's post_request hook: write the finished request into this worker's ring."},
    {"asgi_start", (PyCFunction)(void (*)(void))asgi_start, METH_FASTCALL,
     "asgi_start($module, worker, scope, send, routes, /)\n--\n\n"
     "The recording ASGI layer's start of an HTTP request: pre_request, then the request's Recording."},
    {"note", (PyCFunction)(void (*)(void))note, METH_FASTCALL,
     "note($module, recording, message, /)\n--\n\n"
     "What the application's send does before the message goes out: note the status, record the request before "
     "the last of its response; returns the server's send."},
    {"bind_asgi", bind_asgi, METH_VARARGS,
     "Hand over asgi.py's route_template and queue_stamp, and what current_task reads (it calls this once)."},
    {"current_task", current_task, METH_NOARGS,
     "current_task($module, /)\n--\n\n"
     "The running event loop's current task, else the thread's id (asgi.current_task, compiled)."},
    {"bind", bind_hooks, METH_VARARGS, "Hand over what the hooks need from gunicorn_insight._worker.recorder (it calls this once)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups = {
    PyModuleDef_HEAD_INIT, "gunicorn_insight._worker._speedups",
    "The request hooks of gunicorn_insight._worker.recorder in C; see _speedups.c.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module;
    bound.delegate = 1;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_RECORDER, "RECORDER");
    INTERN(s_path, "path");
    INTERN(s_query, "query");
    INTERN(s_method, "method");
    INTERN(s_peer_addr, "peer_addr");
    INTERN(s_status_code, "status_code");
    INTERN(s_nr_conns, "nr_conns");
    INTERN(s_route_number, "route_number");
    INTERN(s_add_overflow, "add_overflow");
    INTERN(s_headers, "headers");
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s_sock, "sock");
    INTERN(s_client_gone, "client_gone");
    INTERN(s_busy_header, "X-GUNICORN-BUSY");
    INTERN(s_queue_ms_header, "X-GUNICORN-QUEUE-MS");
    INTERN(s_no_queue, "-");
    INTERN(s_type, "type");
    INTERN(s_status, "status");
    INTERN(s_more_body, "more_body");
    INTERN(s_query_string, "query_string");
    INTERN(s_client, "client");
    INTERN(s_root_path, "root_path");
    INTERN(s_route, "route");
    INTERN(s_path_format, "path_format");
    INTERN(s_asgi_scope, "asgi.scope");
    INTERN(s_empty, "");
    INTERN(s_get, "get");
    INTERN(s_call_name, "__call__");
    INTERN(s_http, "http");
    INTERN(s_throw, "throw");
    INTERN(s_close, "close");
#undef INTERN
    if ((minus_one = PyLong_FromLong(-1)) == NULL
        || (not_in_flight = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type)) == NULL)
        return NULL;
    hung_up = PyTuple_Pack(3, PyExc_BrokenPipeError, PyExc_ConnectionResetError, PyExc_ConnectionAbortedError);
    if (hung_up == NULL)
        return NULL;
    if ((five_hundred = PyLong_FromLong(500)) == NULL
        || PyType_Ready(&RecordingType) < 0 || PyType_Ready(&ServingType) < 0 || PyType_Ready(&EntryType) < 0)
        return NULL;
    if (pthread_atfork(NULL, NULL, forget_known_loop) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    module = PyModule_Create(&speedups);
    if (module == NULL || PyModule_AddObjectRef(module, "Entry", (PyObject *)&EntryType) < 0) {
        Py_XDECREF(module);
        return NULL;
    }
    return module;
}
