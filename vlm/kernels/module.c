/* The `vlm.kernels._native` module: packed-matrix handles, `linear`, and the knobs (path,
 * activation mode, threads). vlm/kernels/__init__.py is the documented surface. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <stdlib.h>

#include "kernels.h"
#include "pool.h"

static const vlm_path *path = &vlm_path_portable;
/* Which quantized weights take int8 activations (vlm.kernels.MODES, in this order). */
enum { MODE_W4A8, MODE_INT8, MODE_FLOAT, MODE_COUNT };
static int mode = MODE_W4A8;

static int int8_activations(const vlm_matrix *m) {
    return vlm_is_quant(m->fmt) && (mode == MODE_INT8 || (mode == MODE_W4A8 && m->fmt != FMT_Q8));
}

/* ---- handle ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD vlm_matrix m;
} MatrixObject;

static const char *const format_names[FMT_COUNT] = {"q4_asym", "q4_sym", "q8", "f16", "bf16"};

static void matrix_dealloc(MatrixObject *self) {
    free(self->m.data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *matrix_rows(MatrixObject *self, void *c) { return PyLong_FromLong(self->m.rows); }
static PyObject *matrix_cols(MatrixObject *self, void *c) { return PyLong_FromLong(self->m.cols); }
static PyObject *matrix_kind(MatrixObject *self, void *c) { return PyUnicode_FromString(format_names[self->m.fmt]); }
static PyObject *matrix_nbytes(MatrixObject *self, void *c) {
    return PyLong_FromSize_t((size_t)self->m.panels * self->m.panel_bytes);
}

static PyObject *matrix_repr(MatrixObject *self) {
    return PyUnicode_FromFormat("<vlm.kernels.Matrix %s %dx%d>", format_names[self->m.fmt], self->m.rows,
                                self->m.cols);
}

static PyGetSetDef matrix_getset[] = {
    {"rows", (getter)matrix_rows, NULL, "output features", NULL},
    {"cols", (getter)matrix_cols, NULL, "input features", NULL},
    {"kind", (getter)matrix_kind, NULL, "q4_asym, q4_sym, q8, f16 or bf16", NULL},
    {"nbytes", (getter)matrix_nbytes, NULL, "bytes of the packed copy", NULL},
    {NULL},
};

static PyTypeObject MatrixType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vlm.kernels._native.Matrix",
    .tp_basicsize = sizeof(MatrixObject),
    .tp_dealloc = (destructor)matrix_dealloc,
    .tp_repr = (reprfunc)matrix_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A weight matrix repacked for the native kernels (see vlm.kernels.prepare).",
    .tp_getset = matrix_getset,
};

static MatrixObject *new_matrix(void) {
    MatrixObject *self = PyObject_New(MatrixObject, &MatrixType);
    if (self) self->m.data = NULL;
    return self;
}

/* A C-contiguous array of dtype `type` and ndim 2, or NULL with an exception set. */
static PyArrayObject *as_matrix(PyObject *obj, int type, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(obj, type, NPY_ARRAY_IN_ARRAY);
    if (a && PyArray_NDIM(a) != 2) {
        PyErr_Format(PyExc_ValueError, "%s must be 2-D", what);
        Py_CLEAR(a);
    }
    return a;
}

/* pack_quant(qweight, scales, mins, bits, group_size, symmetric) -> Matrix */
static PyObject *pack_quant(PyObject *mod, PyObject *args) {
    PyObject *qo, *so, *mo;
    int bits, group, symmetric;
    if (!PyArg_ParseTuple(args, "OOOiip", &qo, &so, &mo, &bits, &group, &symmetric)) return NULL;
    if (!((bits == 4 || (bits == 8 && symmetric)) && (group == 32 || group == 64 || group == 128))) {
        PyErr_SetString(PyExc_ValueError, "unsupported quantization");
        return NULL;
    }
    PyArrayObject *q = as_matrix(qo, bits == 4 ? NPY_UINT8 : NPY_INT8, "qweight");
    PyArrayObject *s = q ? as_matrix(so, NPY_FLOAT16, "scales") : NULL;
    PyArrayObject *mn = (s && bits == 4 && !symmetric) ? as_matrix(mo, NPY_FLOAT16, "mins") : NULL;
    MatrixObject *out = NULL;
    if (!s || (bits == 4 && !symmetric && !mn)) goto done;
    const int rows = (int)PyArray_DIM(q, 0), cols = (int)PyArray_DIM(q, 1) * (bits == 4 ? 2 : 1);
    if (cols % group || PyArray_DIM(s, 0) != rows || PyArray_DIM(s, 1) != cols / group ||
        (mn && (PyArray_DIM(mn, 0) != rows || PyArray_DIM(mn, 1) != cols / group))) {
        PyErr_SetString(PyExc_ValueError, "qweight, scales and mins do not agree in shape");
        goto done;
    }
    out = new_matrix();
    if (!out) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    if (bits == 4)
        rc = vlm_pack_q4(&out->m, PyArray_DATA(q), PyArray_DATA(s), mn ? PyArray_DATA(mn) : NULL, rows, cols, group,
                         symmetric);
    else
        rc = vlm_pack_q8(&out->m, PyArray_DATA(q), PyArray_DATA(s), rows, cols, group);
    Py_END_ALLOW_THREADS;
    if (rc) {
        Py_CLEAR(out);
        PyErr_NoMemory();
    }
done:
    Py_XDECREF(q);
    Py_XDECREF(s);
    Py_XDECREF(mn);
    return (PyObject *)out;
}

/* pack_half(data, kind) -> Matrix; kind "f16" (float16 data) or "bf16" (uint16 holding
 * bfloat16 bits). */
static PyObject *pack_half(PyObject *mod, PyObject *args) {
    PyObject *obj;
    const char *kind;
    if (!PyArg_ParseTuple(args, "Os", &obj, &kind)) return NULL;
    int fmt, type;
    if (!strcmp(kind, "f16")) {
        fmt = FMT_F16, type = NPY_FLOAT16;
    } else if (!strcmp(kind, "bf16")) {
        fmt = FMT_BF16, type = NPY_UINT16;
    } else {
        PyErr_Format(PyExc_ValueError, "unknown float kind %s", kind);
        return NULL;
    }
    PyArrayObject *w = as_matrix(obj, type, "data");
    if (!w) return NULL;
    MatrixObject *out = new_matrix();
    if (out) {
        int rc;
        Py_BEGIN_ALLOW_THREADS;
        rc = vlm_pack_half(&out->m, PyArray_DATA(w), fmt, (int)PyArray_DIM(w, 0), (int)PyArray_DIM(w, 1));
        Py_END_ALLOW_THREADS;
        if (rc) {
            Py_CLEAR(out);
            PyErr_NoMemory();
        }
    }
    Py_DECREF(w);
    return (PyObject *)out;
}

/* ---- linear -------------------------------------------------------------------------- */

typedef struct {
    const vlm_matrix *m;
    const float *x; /* the caller's [n][cols] */
    vlm_act a;
    const vlm_path *path;
    int int8;
    int pack_x;   /* float mode: interleave x for the path's token tile (see vlm_act) */
    int per_unit; /* panels per unit, or tokens per unit while preparing activations */
} job;

static int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

static void prepare_task(void *ctx, int u) {
    job *j = ctx;
    const vlm_matrix *m = j->m;
    const size_t K = m->cols, NB = K / RUN, NG = m->group ? K / m->group : 0;
    const int t1 = vlm_min(j->a.n, (u + 1) * j->per_unit);
    for (int t = u * j->per_unit; t < t1; t++) {
        const float *x = j->x + t * K;
        const int w = j->int8 ? j->path->tq : j->path->tf;
        const size_t tile = (size_t)(t / w), lane = (size_t)(t % w);
        if (j->int8) {
            j->path->quantize(x, (int)K, m->group, (int8_t *)j->a.q + tile * K * w + lane * 4,
                              (float *)j->a.d + tile * NB * w + lane, (float *)j->a.s + tile * NG * w + lane, w);
            continue;
        }
        if (j->pack_x) {
            float *dst = (float *)j->a.x + tile * K * w + lane;
            for (size_t k = 0; k < K; k++) dst[k * w] = x[k];
        }
        if (m->fmt == FMT_Q4A) vlm_group_sums(x, (int)K, m->group, (float *)j->a.xs + tile * NG * w + lane, w);
    }
}

static void gemm_task(void *ctx, int u) {
    job *j = ctx;
    const int p0 = u * j->per_unit, p1 = vlm_min(j->m->panels, p0 + j->per_unit);
    (j->int8 ? j->path->gemm_int8 : j->path->gemm_float)(j->m, &j->a, p0, p1);
}

/* Units of work per thread: more than one so a thread that is slowed down (the machine
 * is shared) hands its share to the others. */
#define UNITS_PER_THREAD 4
/* Activations are prepared on the pool only when there are this many values or more. */
#define PARALLEL_PREPARE 65536

/* y[n][rows] = x[n][cols] @ W.T; called without the GIL. Returns -1 when out of memory. */
static int run_linear(const vlm_matrix *m, const float *x, int n, float *y) {
    job j = {.m = m, .x = x, .path = path, .int8 = int8_activations(m)};
    j.pack_x = !j.int8 && path->tf > 1;
    j.a = (vlm_act){.n = n, .cols = m->cols, .x = x, .y = y};
    const int threads = vlm_pool_threads();
    void *scratch = NULL;
    const int asym_float = !j.int8 && m->fmt == FMT_Q4A;
    if (j.int8 || j.pack_x || asym_float) {
        const int w = j.int8 ? path->tq : path->tf;
        const size_t K = m->cols, NB = K / RUN, NG = m->group ? K / m->group : 0;
        const size_t padded = (size_t)ceil_div(n, w) * w; /* whole tiles */
        const size_t per_token = j.int8 ? 4 * NB + 4 * NG + K : 4 * (j.pack_x ? K : 0) + 4 * (asym_float ? NG : 0);
        scratch = malloc(per_token * padded);
        if (!scratch) return -1;
        float *f = scratch;
        if (j.int8) {
            j.a.d = f;
            j.a.s = f + NB * padded;
            j.a.q = (const int8_t *)(f + (NB + NG) * padded);
        } else {
            if (j.pack_x) j.a.x = f;
            j.a.xs = f + (j.pack_x ? K : 0) * padded;
        }
        const int units = (size_t)n * K >= PARALLEL_PREPARE ? vlm_min(n, threads) : 1;
        j.per_unit = ceil_div(n, units);
        vlm_pool_run(prepare_task, &j, ceil_div(n, j.per_unit));
    }
    j.per_unit = ceil_div(m->panels, (long)threads * UNITS_PER_THREAD);
    vlm_pool_run(gemm_task, &j, ceil_div(m->panels, j.per_unit));
    free(scratch);
    return 0;
}

/* linear(x, matrix) -> y: x float32 [..., cols] (converted if needed), y float32 [..., rows]. */
static PyObject *linear(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyObject_TypeCheck(args[1], &MatrixType)) {
        PyErr_SetString(PyExc_TypeError, "linear(x, matrix) takes an array and a prepared Matrix");
        return NULL;
    }
    const vlm_matrix *m = &((MatrixObject *)args[1])->m;
    const int flags = NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST;
    PyArrayObject *x = (PyArrayObject *)PyArray_FROM_OTF(args[0], NPY_FLOAT32, flags);
    if (!x) return NULL;
    const int nd = PyArray_NDIM(x);
    if (nd < 1 || PyArray_DIM(x, nd - 1) != m->cols) {
        PyErr_Format(PyExc_ValueError, "x must have %d features in its last axis", m->cols);
        Py_DECREF(x);
        return NULL;
    }
    npy_intp dims[NPY_MAXDIMS];
    for (int i = 0; i < nd; i++) dims[i] = PyArray_DIM(x, i);
    dims[nd - 1] = m->rows;
    PyArrayObject *y = (PyArrayObject *)PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
    if (!y) {
        Py_DECREF(x);
        return NULL;
    }
    const npy_intp n = m->cols ? PyArray_SIZE(x) / m->cols : 0;
    int rc = 0;
    if (n > 0 && m->rows > 0) {
        Py_BEGIN_ALLOW_THREADS;
        rc = run_linear(m, PyArray_DATA(x), (int)n, PyArray_DATA(y));
        Py_END_ALLOW_THREADS;
    } else if (m->rows > 0) {
        memset(PyArray_DATA(y), 0, PyArray_NBYTES(y)); /* cols == 0: an empty sum */
    }
    Py_DECREF(x);
    if (rc) {
        Py_DECREF(y);
        return PyErr_NoMemory();
    }
    return (PyObject *)y;
}

/* ---- knobs ------------------------------------------------------------------------- */

static const vlm_path *find_path(const char *name) {
    if (!strcmp(name, "portable")) return &vlm_path_portable;
#ifdef VLM_X86
    __builtin_cpu_init();
    if (!strcmp(name, "avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return &vlm_path_avx2;
    if (!strcmp(name, "avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return &vlm_path_avx512;
#endif
    return NULL;
}

static const char *const path_order[] = {"avx512", "avx2", "portable"};

static PyObject *supported_paths(PyObject *mod, PyObject *unused) {
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out && i < sizeof path_order / sizeof *path_order; i++) {
        if (!find_path(path_order[i])) continue;
        PyObject *s = PyUnicode_FromString(path_order[i]);
        if (!s || PyList_Append(out, s)) Py_CLEAR(out);
        Py_XDECREF(s);
    }
    return out;
}

/* set_path(name): "portable", "avx2" or "avx512"; ValueError when this CPU lacks it. */
static PyObject *set_path(PyObject *mod, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    const vlm_path *p = find_path(name);
    if (!p) return PyErr_Format(PyExc_ValueError, "kernel path %s is not available on this CPU", name);
    path = p;
    Py_RETURN_NONE;
}

static PyObject *get_path(PyObject *mod, PyObject *unused) { return PyUnicode_FromString(path->name); }

static PyObject *set_mode(PyObject *mod, PyObject *arg) {
    const long m = PyLong_AsLong(arg);
    if (m == -1 && PyErr_Occurred()) return NULL;
    if (m < 0 || m >= MODE_COUNT) return PyErr_Format(PyExc_ValueError, "no mode %ld", m);
    mode = (int)m;
    Py_RETURN_NONE;
}

static PyObject *get_mode(PyObject *mod, PyObject *unused) { return PyLong_FromLong(mode); }

static PyObject *set_threads(PyObject *mod, PyObject *arg) {
    const long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) return PyErr_Format(PyExc_ValueError, "threads must be in 1..1024, got %ld", n);
    Py_BEGIN_ALLOW_THREADS;
    vlm_pool_set_threads((int)n);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *get_threads(PyObject *mod, PyObject *unused) { return PyLong_FromLong(vlm_pool_threads()); }

static PyMethodDef methods[] = {
    {"pack_quant", pack_quant, METH_VARARGS, "pack_quant(qweight, scales, mins, bits, group_size, symmetric)"},
    {"pack_half", pack_half, METH_VARARGS, "pack_half(data, kind)"},
    {"linear", (PyCFunction)(void (*)(void))linear, METH_FASTCALL, "linear(x, matrix) -> x @ W.T"},
    {"supported_paths", supported_paths, METH_NOARGS, "paths this CPU can run, best first"},
    {"set_path", set_path, METH_O, "set_path(name)"},
    {"get_path", get_path, METH_NOARGS, "the path in use"},
    {"set_mode", set_mode, METH_O, "set_mode(index into vlm.kernels.MODES)"},
    {"get_mode", get_mode, METH_NOARGS, "the mode's index in vlm.kernels.MODES"},
    {"set_threads", set_threads, METH_O, "set_threads(n)"},
    {"get_threads", get_threads, METH_NOARGS, "threads per call, the caller included"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_native",
    .m_doc = "Native kernels; see vlm.kernels.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    import_array();
    if (PyType_Ready(&MatrixType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    Py_INCREF(&MatrixType);
    if (PyModule_AddObject(mod, "Matrix", (PyObject *)&MatrixType) < 0) {
        Py_DECREF(&MatrixType);
        Py_DECREF(mod);
        return NULL;
    }
    for (size_t i = 0; i < sizeof path_order / sizeof *path_order; i++) {
        const vlm_path *p = find_path(path_order[i]);
        if (p) {
            path = p;
            break;
        }
    }
    return mod;
}
