/* annofs.content._hashcheck: check many fragments against their BLAKE3 hashes in one call.
 *
 * The mount's read path checks ~64 fragments per 1 MiB request. With the blake3 package,
 * each check is a Python call that takes and drops the GIL; here the whole batch is hashed
 * with the GIL released once, and a large batch is split between the caller's thread and
 * one more, so a cold sequential read can use the second CPU for its hashing. Handing the
 * halves to a Python thread pool cost more in GIL handoffs than it saved (measured). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <string.h>
#include "blake3/blake3.h"

/* Below this many bytes in all, a second thread costs more than it saves. */
#define SPLIT_BYTES (256 * 1024)
/* hashlib's HASHLIB_GIL_MINSIZE: below it, releasing the GIL costs more than the hash. */
#define GIL_MINSIZE 2048

typedef struct {
    const Py_buffer *views;
    Py_ssize_t lo, hi;
    uint8_t *out;
} span_t;

static void hash_span(const span_t *s) {
    for (Py_ssize_t i = s->lo; i < s->hi; i++) {
        blake3_hasher h;
        blake3_hasher_init(&h);
        blake3_hasher_update(&h, s->views[i].buf, (size_t)s->views[i].len);
        blake3_hasher_finalize(&h, s->out + BLAKE3_OUT_LEN * i, BLAKE3_OUT_LEN);
    }
}

static void *hash_span_thread(void *arg) {
    hash_span((const span_t *)arg);
    return NULL;
}

/* Hashes views[0..n) into out; the second half by bytes in a thread of its own. */
static void hash_all(const Py_buffer *views, Py_ssize_t n, Py_ssize_t total, int threads,
                     uint8_t *out) {
    span_t all = {views, 0, n, out};
    if (threads < 2 || n < 2 || total < SPLIT_BYTES) {
        hash_span(&all);
        return;
    }
    Py_ssize_t half = 0, acc = 0;
    while (half < n - 1 && acc < total / 2)
        acc += views[half++].len;
    span_t first = {views, 0, half, out}, second = {views, half, n, out};
    pthread_t t;
    if (pthread_create(&t, NULL, hash_span_thread, &second) != 0) {
        hash_span(&all);  /* no thread to be had: all of it here */
        return;
    }
    hash_span(&first);
    pthread_join(t, NULL);
}

PyDoc_STRVAR(first_mismatch_doc,
"first_mismatch(datas, hashes, threads=1) -> int\n\n"
"The index of the first of `datas` (objects with the buffer protocol) whose BLAKE3\n"
"hash is not the 32 bytes at the same index of `hashes`, or -1 if all match. The\n"
"hashing runs without the GIL; with threads=2 a batch of 256 KiB or more is split\n"
"between this thread and one more. The buffers must not change during the call.");

static PyObject *first_mismatch(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"datas", "hashes", "threads", NULL};
    PyObject *datas, *hashes, *fd = NULL, *fh = NULL, *result = NULL;
    int threads = 1;
    Py_buffer *views = NULL;
    uint8_t *out = NULL;
    Py_ssize_t n, got = 0, total = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|i", kwlist, &datas, &hashes, &threads))
        return NULL;
    if (!(fd = PySequence_Fast(datas, "datas must be a sequence")))
        goto done;
    if (!(fh = PySequence_Fast(hashes, "hashes must be a sequence")))
        goto done;
    n = PySequence_Fast_GET_SIZE(fd);
    if (PySequence_Fast_GET_SIZE(fh) != n) {
        PyErr_Format(PyExc_ValueError, "%zd datas but %zd hashes", n,
                     PySequence_Fast_GET_SIZE(fh));
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PySequence_Fast_GET_ITEM(fh, i);
        if (!PyBytes_Check(h) || PyBytes_GET_SIZE(h) != BLAKE3_OUT_LEN) {
            PyErr_Format(PyExc_ValueError, "hashes[%zd] is not 32 bytes", i);
            goto done;
        }
    }
    views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    out = PyMem_Malloc(BLAKE3_OUT_LEN * (n ? n : 1));
    if (!views || !out) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fd, got), &views[got],
                               PyBUF_SIMPLE) < 0)
            goto done;
        total += views[got].len;
    }
    if (total < GIL_MINSIZE) {
        hash_all(views, n, total, 1, out);
    } else {
        Py_BEGIN_ALLOW_THREADS
        hash_all(views, n, total, threads, out);
        Py_END_ALLOW_THREADS
    }
    Py_ssize_t bad = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (memcmp(PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(fh, i)),
                   out + BLAKE3_OUT_LEN * i, BLAKE3_OUT_LEN) != 0) {
            bad = i;
            break;
        }
    }
    result = PyLong_FromSsize_t(bad);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(out);
    Py_XDECREF(fd);
    Py_XDECREF(fh);
    return result;
}

static PyMethodDef methods[] = {
    {"first_mismatch", (PyCFunction)(void (*)(void))first_mismatch,
     METH_VARARGS | METH_KEYWORDS, first_mismatch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "annofs.content._hashcheck",
    "BLAKE3 checks of many fragments in one call, without the GIL.", -1, methods,
};

PyMODINIT_FUNC PyInit__hashcheck(void) {
    return PyModule_Create(&module);
}
