/* The `vlm.kernels._native` module: packed-matrix handles, `linear`, attention and the row
 * ops, the fused decoder step (`DecoderPlan`), and the knobs (path, activation mode,
 * threads). vlm/kernels/__init__.py is the documented surface. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <limits.h>
#include <stdlib.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "kernels.h"
#include "pool.h"
#ifdef VLM_X86
#include <cpuid.h>
#endif

static const vlm_path *path = &vlm_path_portable;
static int mode = MODE_W4A8; /* an index into vlm.kernels.MODES */

/* ---- handle ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD vlm_matrix m;
} MatrixObject;

static const char *const format_names[FMT_COUNT] = {"q4_asym", "q4_sym", "iq4_nl", "q8", "q8_asym", "f16", "bf16"};

static void matrix_dealloc(MatrixObject *self) {
    free(self->m.data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *matrix_rows(MatrixObject *self, void *Py_UNUSED(c)) { return PyLong_FromLong(self->m.rows); }
static PyObject *matrix_cols(MatrixObject *self, void *Py_UNUSED(c)) { return PyLong_FromLong(self->m.cols); }
static PyObject *matrix_kind(MatrixObject *self, void *Py_UNUSED(c)) { return PyUnicode_FromString(format_names[self->m.fmt]); }
static PyObject *matrix_nbytes(MatrixObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromSize_t((size_t)self->m.panels * self->m.panel_bytes);
}

static PyObject *matrix_repr(MatrixObject *self) {
    return PyUnicode_FromFormat("<vlm.kernels.Matrix %s %dx%d>", format_names[self->m.fmt], self->m.rows,
                                self->m.cols);
}

static PyGetSetDef matrix_getset[] = {
    {"rows", (getter)matrix_rows, NULL, "output features", NULL},
    {"cols", (getter)matrix_cols, NULL, "input features", NULL},
    {"kind", (getter)matrix_kind, NULL, "q4_asym, q4_sym, iq4_nl, q8, f16 or bf16", NULL},
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
    if (self) {
        self->m.data = NULL;
        self->m.int8_acts = 0;
    }
    return self;
}

/* An array of dtype `type` read in place where its layout allows: ndim 2, or 3 for quants
 * (`run`: the length of the last axis, whose items must be adjacent), no negative strides.
 * Anything else is copied into C order. NULL with an exception set on failure. */
static PyArrayObject *as_source(PyObject *obj, int type, int run, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(obj, type, NPY_ARRAY_ALIGNED);
    if (!a) return NULL;
    const int nd = PyArray_NDIM(a);
    if (!(nd == 2 || (run && nd == 3 && PyArray_DIM(a, 2) == run))) {
        PyErr_Format(PyExc_ValueError, run ? "%s must be 2-D, or 3-D with %d values a run" : "%s must be 2-D", what,
                     run);
        Py_DECREF(a);
        return NULL;
    }
    int in_place = !run || PyArray_STRIDE(a, nd - 1) == PyArray_ITEMSIZE(a);
    for (int i = 0; i < nd; i++) in_place &= PyArray_STRIDE(a, i) >= 0;
    if (!in_place) {
        PyArrayObject *c = (PyArrayObject *)PyArray_NewCopy(a, NPY_CORDER);
        Py_DECREF(a);
        a = c;
    }
    return a;
}

/* Item (r, j) of a source from as_source: a value of a 2-D array, or run j of a 3-D one. A
 * 2-D quants array [rows][cols] holds runs of `run` bytes back to back. */
static vlm_strided strided(PyArrayObject *a, int run) {
    const ptrdiff_t step = PyArray_NDIM(a) == 3 ? PyArray_STRIDE(a, 1) : run ? run : PyArray_STRIDE(a, 1);
    return (vlm_strided){PyArray_DATA(a), PyArray_STRIDE(a, 0), step};
}

/* The values per row of a quants source. */
static npy_intp row_values(PyArrayObject *a) {
    return PyArray_NDIM(a) == 3 ? PyArray_DIM(a, 1) * PyArray_DIM(a, 2) : PyArray_DIM(a, 1);
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

/* drop_source_pages asks the packer to drop the sources' file pages as it goes (see pack.c).
 * Only when every source is the caller's own array: a converted (copied) one is heap memory. */
static int may_drop(int asked, PyObject *const *given, PyArrayObject *const *used, int n) {
    for (int i = 0; i < n; i++)
        if (used[i] && (PyObject *)used[i] != given[i]) return 0;
    return asked;
}

/* pack_quant(qweight, scales, mins, kind, group_size, int8_activations=False, drop_source_pages=False)
 * -> Matrix; kind one of the quantized format_names (QuantizedWeight.kind). */
static PyObject *pack_quant(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *qo, *so, *mo;
    const char *kind;
    int group, int8_acts = 0, drop = 0;
    if (!PyArg_ParseTuple(args, "OOOsi|pp", &qo, &so, &mo, &kind, &group, &int8_acts, &drop)) return NULL;
    int fmt = 0;
    while (fmt <= FMT_Q8A && strcmp(kind, format_names[fmt])) fmt++;
    if (fmt > FMT_Q8A || !(group == 32 || group == 64 || group == 128 || (group == 16 && vlm_is_8bit(fmt)))) {
        PyErr_SetString(PyExc_ValueError, "unsupported quantization");
        return NULL;
    }
    const int bits = vlm_is_8bit(fmt) ? 8 : 4, symmetric = !vlm_has_mins(fmt);
    const int run = bits == 4 ? RUN / 2 : RUN; /* bytes of one run of 32 values */
    PyArrayObject *q = as_source(qo, bits == 4 ? NPY_UINT8 : NPY_INT8, run, "qweight");
    PyArrayObject *s = q ? as_source(so, NPY_FLOAT16, 0, "scales") : NULL;
    PyArrayObject *mn = (s && !symmetric) ? as_source(mo, NPY_FLOAT16, 0, "mins") : NULL;
    MatrixObject *out = NULL;
    if (!s || (!symmetric && !mn)) goto done;
    const int rows = (int)PyArray_DIM(q, 0), cols = (int)row_values(q) * (bits == 4 ? 2 : 1);
    if (cols % group || PyArray_DIM(s, 0) != rows || PyArray_DIM(s, 1) != cols / group ||
        (mn && (PyArray_DIM(mn, 0) != rows || PyArray_DIM(mn, 1) != cols / group))) {
        PyErr_SetString(PyExc_ValueError, "qweight, scales and mins do not agree in shape");
        goto done;
    }
    drop = may_drop(drop, (PyObject *const[]){qo, so, mo}, (PyArrayObject *const[]){q, s, mn}, 3);
    out = new_matrix();
    if (!out) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    const vlm_strided no_mins = {NULL, 0, 0};
    if (bits == 4)
        rc = vlm_pack_q4(&out->m, strided(q, run), strided(s, 0), mn ? strided(mn, 0) : no_mins, rows, cols, group,
                         fmt, drop);
    else
        rc = vlm_pack_q8(&out->m, strided(q, run), strided(s, 0), mn ? strided(mn, 0) : no_mins, rows, cols, group,
                         drop);
    Py_END_ALLOW_THREADS;
    if (rc) {
        Py_CLEAR(out);
        PyErr_NoMemory();
    } else {
        out->m.int8_acts = int8_acts;
    }
done:
    Py_XDECREF(q);
    Py_XDECREF(s);
    Py_XDECREF(mn);
    return (PyObject *)out;
}

/* pack_half(data, kind, drop_source_pages=False) -> Matrix; kind "f16" (float16 data) or
 * "bf16" (uint16 holding bfloat16 bits). */
static PyObject *pack_half(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *obj;
    const char *kind;
    int drop = 0;
    if (!PyArg_ParseTuple(args, "Os|p", &obj, &kind, &drop)) return NULL;
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
    drop = may_drop(drop, &obj, &w, 1);
    MatrixObject *out = new_matrix();
    if (out) {
        int rc;
        Py_BEGIN_ALLOW_THREADS;
        rc = vlm_pack_half(&out->m, PyArray_DATA(w), fmt, (int)PyArray_DIM(w, 0), (int)PyArray_DIM(w, 1), drop);
        Py_END_ALLOW_THREADS;
        if (rc) {
            Py_CLEAR(out);
            PyErr_NoMemory();
        }
    }
    Py_DECREF(w);
    return (PyObject *)out;
}

/* unpack_rows(matrix, ids) -> float32 [len(ids), cols]: rows of the packed matrix, as the
 * numpy reference dequantizes them. Lets a tied embedding be read from the output head. */
static PyObject *unpack_rows(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *mo, *io;
    if (!PyArg_ParseTuple(args, "O!O", &MatrixType, &mo, &io)) return NULL;
    const vlm_matrix *m = &((MatrixObject *)mo)->m;
    PyArrayObject *ids = (PyArrayObject *)PyArray_FROM_OTF(io, NPY_INT64, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!ids) return NULL;
    const npy_intp n = PyArray_SIZE(ids);
    const int64_t *id = PyArray_DATA(ids);
    for (npy_intp i = 0; i < n; i++) {
        if (id[i] < 0 || id[i] >= m->rows) {
            Py_DECREF(ids);
            return PyErr_Format(PyExc_IndexError, "row %lld is out of range for %d rows", (long long)id[i], m->rows);
        }
    }
    npy_intp dims[2] = {n, m->cols};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (out) {
        float *y = PyArray_DATA(out);
        for (npy_intp i = 0; i < n; i++) vlm_unpack_row(m, (int)id[i], y + i * m->cols);
    }
    Py_DECREF(ids);
    return (PyObject *)out;
}

/* ---- linear -------------------------------------------------------------------------- */

/* linear(x, matrix) -> y: x float32 [..., cols] (converted if needed), y float32 [..., rows].
 * linears(x, matrices) -> (y, ...): several matrices of x's cols (at most VLM_MAX_PRODUCTS),
 * x's activations prepared once for all and one job on the pool (q/k/v, gate/up). */
static PyObject *products(PyObject *xo, PyObject *const *mats, Py_ssize_t count) {
    const vlm_matrix *ms[VLM_MAX_PRODUCTS];
    for (Py_ssize_t i = 0; i < count; i++) {
        ms[i] = &((MatrixObject *)mats[i])->m;
        if (ms[i]->cols != ms[0]->cols) {
            PyErr_SetString(PyExc_ValueError, "linears needs matrices of the same input features");
            return NULL;
        }
    }
    PyArrayObject *x = (PyArrayObject *)PyArray_FROM_OTF(xo, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!x) return NULL;
    const int nd = PyArray_NDIM(x), cols = ms[0]->cols;
    if (nd < 1 || PyArray_DIM(x, nd - 1) != cols) {
        PyErr_Format(PyExc_ValueError, "x must have %d features in its last axis", cols);
        Py_DECREF(x);
        return NULL;
    }
    PyObject *out = PyTuple_New(count);
    float *ys[VLM_MAX_PRODUCTS];
    npy_intp dims[NPY_MAXDIMS];
    for (int i = 0; i < nd; i++) dims[i] = PyArray_DIM(x, i);
    for (Py_ssize_t i = 0; out && i < count; i++) {
        dims[nd - 1] = ms[i]->rows;
        PyArrayObject *y = (PyArrayObject *)PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
        if (!y) Py_CLEAR(out);
        else {
            PyTuple_SET_ITEM(out, i, (PyObject *)y);
            ys[i] = PyArray_DATA(y);
            if (!cols) memset(ys[i], 0, PyArray_NBYTES(y)); /* an empty sum */
        }
    }
    const npy_intp n = cols ? PyArray_SIZE(x) / cols : 0;
    int rc = 0;
    if (out && n > 0) {
        Py_BEGIN_ALLOW_THREADS;
        rc = vlm_linears(path, mode, ms, (int)count, PyArray_DATA(x), (int)n, ys);
        Py_END_ALLOW_THREADS;
    }
    Py_DECREF(x);
    if (rc) {
        Py_CLEAR(out);
        return PyErr_NoMemory();
    }
    return out;
}

static PyObject *linear(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyObject_TypeCheck(args[1], &MatrixType)) {
        PyErr_SetString(PyExc_TypeError, "linear(x, matrix) takes an array and a prepared Matrix");
        return NULL;
    }
    PyObject *ys = products(args[0], args + 1, 1);
    PyObject *y = ys ? PyTuple_GET_ITEM(ys, 0) : NULL;
    Py_XINCREF(y);
    Py_XDECREF(ys);
    return y;
}

static PyObject *linears(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs) {
    PyObject *seq = nargs == 2 ? PySequence_Fast(args[1], "linears(x, matrices) takes a sequence of matrices") : NULL;
    if (!seq) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "linears(x, matrices) takes two arguments");
        return NULL;
    }
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **mats = PySequence_Fast_ITEMS(seq);
    int ok = count >= 1 && count <= VLM_MAX_PRODUCTS;
    for (Py_ssize_t i = 0; ok && i < count; i++) ok = PyObject_TypeCheck(mats[i], &MatrixType);
    PyObject *out = ok ? products(args[0], mats, count) : NULL;
    if (!ok) PyErr_Format(PyExc_TypeError, "linears takes 1 to %d prepared Matrix objects", VLM_MAX_PRODUCTS);
    Py_DECREF(seq);
    return out;
}

/* ---- attention and row ops ----------------------------------------------------------- */

/* obj as float32 with `ndim` axes, the last one contiguous and every stride a whole number
 * of floats: a view when it already is, else a copy. NULL with an exception set. */
static PyArrayObject *as_rows(PyObject *obj, int ndim, int type, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(obj, type, NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    if (!a) return NULL;
    const int nd = PyArray_NDIM(a);
    if (nd != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-D", what, ndim);
        Py_DECREF(a);
        return NULL;
    }
    const npy_intp size = PyArray_ITEMSIZE(a);
    int ok = PyArray_DIM(a, nd - 1) <= 1 || PyArray_STRIDE(a, nd - 1) == size;
    for (int i = 0; i < nd - 1; i++) ok &= PyArray_STRIDE(a, i) % size == 0;
    if (!ok) {
        PyArrayObject *c = (PyArrayObject *)PyArray_FROM_OTF((PyObject *)a, type, NPY_ARRAY_IN_ARRAY);
        Py_DECREF(a);
        a = c;
    }
    return a;
}

/* Stride of axis i in floats. */
static ptrdiff_t fstride(PyArrayObject *a, int i) { return PyArray_STRIDE(a, i) / PyArray_ITEMSIZE(a); }

/* attention(q, k, v, causal_offset) -> o: q [h, n, d], k/v [h_kv, t, d] -> o [h, n, d] (a view
 * of an [n, h, d] array, the layout the output projection reads). k and v are read as they
 * are when both are float16 (a half-precision KV cache), else as float32. */
static PyObject *attention(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *qo, *ko, *vo, *off;
    if (!PyArg_ParseTuple(args, "OOOO", &qo, &ko, &vo, &off)) return NULL;
    const long offset = off == Py_None ? 0 : PyLong_AsLong(off);
    if (offset == -1 && PyErr_Occurred()) return NULL;
    const int half = PyArray_Check(ko) && PyArray_Check(vo) && PyArray_TYPE((PyArrayObject *)ko) == NPY_FLOAT16 &&
                     PyArray_TYPE((PyArrayObject *)vo) == NPY_FLOAT16;
    const int kv_type = half ? NPY_FLOAT16 : NPY_FLOAT32;
    PyArrayObject *q = as_rows(qo, 3, NPY_FLOAT32, "q"), *k = q ? as_rows(ko, 3, kv_type, "k") : NULL;
    PyArrayObject *v = k ? as_rows(vo, 3, kv_type, "v") : NULL;
    PyArrayObject *out = NULL;
    if (!v) goto done;
    const int h = (int)PyArray_DIM(q, 0), n = (int)PyArray_DIM(q, 1), d = (int)PyArray_DIM(q, 2);
    const int h_kv = (int)PyArray_DIM(k, 0), t = (int)PyArray_DIM(k, 1);
    if (PyArray_DIM(k, 2) != d || PyArray_DIM(v, 0) != h_kv || PyArray_DIM(v, 1) != t || PyArray_DIM(v, 2) != d ||
        h_kv < 1 || h % h_kv || d < 1 || d > VLM_MAX_HEAD_DIM || t < 1 || offset < 0 || offset > INT_MAX - n) {
        PyErr_Format(PyExc_ValueError, "attention needs q [h, n, d], k and v [h_kv, t, d] with h_kv dividing h, "
                     "1 <= d <= %d, t >= 1 and causal_offset None or >= 0", VLM_MAX_HEAD_DIM);
        goto done;
    }
    const npy_intp dims[3] = {n, h, d};
    out = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    if (!out) goto done;
    const vlm_attn a = {.h = h, .h_kv = h_kv, .n = n, .t = t, .d = d, .causal = off != Py_None, .offset = (int)offset,
                        .scale = vlm_attn_scale(d), .q = PyArray_DATA(q), .k = PyArray_DATA(k), .v = PyArray_DATA(v),
                        .kv_half = half, .o = PyArray_DATA(out), .qh = fstride(q, 0), .qn = fstride(q, 1), .kh = fstride(k, 0),
                        .kt = fstride(k, 1), .vh = fstride(v, 0), .vt = fstride(v, 1), .oh = d, .on = (ptrdiff_t)h * d};
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = vlm_attention(path, &a);
    Py_END_ALLOW_THREADS;
    if (rc) {
        Py_CLEAR(out);
        PyErr_NoMemory();
    }
done:
    Py_XDECREF(q);
    Py_XDECREF(k);
    Py_XDECREF(v);
    if (!out) return NULL;
    PyArray_Dims perm = {(npy_intp[]){1, 0, 2}, 3};
    PyObject *view = PyArray_Transpose(out, &perm);
    Py_DECREF(out);
    return view;
}

/* store_half(dst, src): dst[...] = src rounded to fp16 as numpy's cast rounds, F16C-fast. dst:
 * a writable float16 [a, b, d] array (a KV cache view: any strides, d contiguous); src: the
 * same shape, converted to float32 if needed. */
static PyObject *store_half(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *dsto, *srco;
    if (!PyArg_ParseTuple(args, "O!O", &PyArray_Type, &dsto, &srco)) return NULL;
    PyArrayObject *dst = (PyArrayObject *)dsto, *src = as_rows(srco, 3, NPY_FLOAT32, "src");
    if (!src) return NULL;
    if (PyArray_TYPE(dst) != NPY_FLOAT16 || PyArray_NDIM(dst) != 3 || !PyArray_ISWRITEABLE(dst) ||
        !PyArray_SAMESHAPE(dst, src) || (PyArray_DIM(dst, 2) > 1 && PyArray_STRIDE(dst, 2) != 2) ||
        PyArray_STRIDE(dst, 0) % 2 || PyArray_STRIDE(dst, 1) % 2) {
        Py_DECREF(src);
        PyErr_SetString(PyExc_ValueError, "store_half needs a writable float16 [a, b, d] dst, d contiguous, and src "
                                          "of the same shape");
        return NULL;
    }
    const int A = (int)PyArray_DIM(dst, 0), B = (int)PyArray_DIM(dst, 1), d = (int)PyArray_DIM(dst, 2);
    Py_BEGIN_ALLOW_THREADS;
    for (int i = 0; i < A; i++)
        for (int j = 0; j < B; j++)
            path->ops->to_half((const float *)PyArray_DATA(src) + i * fstride(src, 0) + j * fstride(src, 1), d,
                               (uint16_t *)PyArray_DATA(dst) + i * fstride(dst, 0) + j * fstride(dst, 1));
    Py_END_ALLOW_THREADS;
    Py_DECREF(src);
    Py_RETURN_NONE;
}

/* A C-contiguous float32 copy or view of obj, or NULL with an exception set. */
static PyArrayObject *as_contiguous(PyObject *obj) {
    return (PyArrayObject *)PyArray_FROM_OTF(obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
}

/* rms_norm(x, weight, eps) -> x / sqrt(mean(x^2, last axis) + eps) * weight */
static PyObject *rms_norm(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *xo, *wo;
    float eps;
    if (!PyArg_ParseTuple(args, "OOf", &xo, &wo, &eps)) return NULL;
    PyArrayObject *x = as_contiguous(xo), *w = x ? as_contiguous(wo) : NULL, *y = NULL;
    if (!w) goto done;
    const int nd = PyArray_NDIM(x);
    const npy_intp n = nd ? PyArray_DIM(x, nd - 1) : 0;
    if (nd < 1 || PyArray_NDIM(w) != 1 || PyArray_DIM(w, 0) != n) {
        PyErr_SetString(PyExc_ValueError, "rms_norm needs x [..., n] and weight [n]");
        goto done;
    }
    y = (PyArrayObject *)PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0);
    if (!y || n == 0) goto done;
    Py_BEGIN_ALLOW_THREADS;
    vlm_rms_norm_rows(path, PyArray_DATA(x), PyArray_DATA(w), eps, (int)(PyArray_SIZE(x) / n), (int)n,
                      PyArray_DATA(y));
    Py_END_ALLOW_THREADS;
done:
    Py_XDECREF(x);
    Py_XDECREF(w);
    return (PyObject *)y;
}

/* swiglu(gate, up) -> silu(gate) * up */
static PyObject *swiglu(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *go, *uo;
    if (!PyArg_ParseTuple(args, "OO", &go, &uo)) return NULL;
    PyArrayObject *g = as_contiguous(go), *u = g ? as_contiguous(uo) : NULL, *y = NULL;
    if (!u) goto done;
    if (!PyArray_SAMESHAPE(g, u)) {
        PyErr_SetString(PyExc_ValueError, "swiglu needs gate and up of one shape");
        goto done;
    }
    y = (PyArrayObject *)PyArray_NewLikeArray(g, NPY_CORDER, NULL, 0);
    if (!y) goto done;
    Py_BEGIN_ALLOW_THREADS;
    vlm_swiglu_rows(path, PyArray_DATA(g), PyArray_DATA(u), (size_t)PyArray_SIZE(g), PyArray_DATA(y));
    Py_END_ALLOW_THREADS;
done:
    Py_XDECREF(g);
    Py_XDECREF(u);
    return (PyObject *)y;
}

/* rotary(x, cos, sin) -> x * cos + rotate_half(x) * sin: x [h, n, d] (any strides), cos and
 * sin [n, d]; the result has x's memory order. */
static PyObject *rotary(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *xo, *co, *so;
    if (!PyArg_ParseTuple(args, "OOO", &xo, &co, &so)) return NULL;
    PyArrayObject *x = as_rows(xo, 3, NPY_FLOAT32, "x"), *c = x ? as_contiguous(co) : NULL, *s = c ? as_contiguous(so) : NULL;
    PyArrayObject *y = NULL;
    if (!s) goto done;
    const int h = (int)PyArray_DIM(x, 0), n = (int)PyArray_DIM(x, 1), d = (int)PyArray_DIM(x, 2);
    if (d % 2 || PyArray_NDIM(c) != 2 || PyArray_DIM(c, 0) != n || PyArray_DIM(c, 1) != d || !PyArray_SAMESHAPE(c, s)) {
        PyErr_SetString(PyExc_ValueError, "rotary needs x [h, n, d] with d even, cos and sin [n, d]");
        goto done;
    }
    y = (PyArrayObject *)PyArray_NewLikeArray(x, NPY_KEEPORDER, NULL, 0);
    if (!y) goto done;
    Py_BEGIN_ALLOW_THREADS;
    vlm_rotary_heads(path, PyArray_DATA(x), fstride(x, 0), fstride(x, 1), PyArray_DATA(c), PyArray_DATA(s), h, n, d,
                     PyArray_DATA(y), fstride(y, 0), fstride(y, 1));
    Py_END_ALLOW_THREADS;
done:
    Py_XDECREF(x);
    Py_XDECREF(c);
    Py_XDECREF(s);
    return (PyObject *)y;
}

/* ---- the fused decoder step ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD vlm_decoder dec;
    vlm_layer *layers;
    PyObject *refs; /* a list of every array and Matrix the plan points into */
} PlanObject;

static void plan_dealloc(PlanObject *self) {
    free(self->dec.scratch);
    free(self->layers);
    Py_XDECREF(self->refs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The data of a float32 vector of n values (None: NULL when allowed), kept alive by refs. */
static int plan_vector(PyObject *refs, PyObject *obj, npy_intp n, int allow_none, const float **out) {
    if (obj == Py_None && allow_none) {
        *out = NULL;
        return 0;
    }
    PyArrayObject *a = as_contiguous(obj);
    if (!a) return -1;
    const int ok = PyArray_NDIM(a) == 1 && PyArray_DIM(a, 0) == n;
    if (!ok || PyList_Append(refs, (PyObject *)a)) {
        if (!ok) PyErr_Format(PyExc_ValueError, "expected a vector of %zd values", (Py_ssize_t)n);
        Py_DECREF(a);
        return -1;
    }
    *out = PyArray_DATA(a);
    Py_DECREF(a);
    return 0;
}

/* A KV cache array (written in place): float32 or float16 [layers, h_kv, max_len, d], C order,
 * of the plan's shape. */
static int plan_cache(const vlm_decoder *dec, PyObject *obj, int type) {
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_Check(obj) || PyArray_TYPE(a) != type || (type != NPY_FLOAT32 && type != NPY_FLOAT16) || PyArray_NDIM(a) != 4 || !PyArray_IS_C_CONTIGUOUS(a) ||
        !PyArray_ISWRITEABLE(a) || PyArray_DIM(a, 0) != dec->n_layers || PyArray_DIM(a, 1) != dec->n_kv ||
        PyArray_DIM(a, 3) != dec->head_dim || PyArray_DIM(a, 2) > INT_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "a KV cache must be writable float32 or float16 [%d, %d, max_len, %d] in C order, all of one dtype",
                     dec->n_layers, dec->n_kv, dec->head_dim);
        return -1;
    }
    return 0;
}

/* DecoderPlan(layers, norm, eps, n_heads); each layer is a tuple
 * (norm_in, norm_post, (q, k, v, o, gate, up, down) Matrices, their 7 biases or None).
 * The plan holds the weights only: each step names the KV caches it reads and writes. */
static PyObject *plan_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *layers, *norm;
    float eps;
    int n_heads;
    static char *kwlist[] = {"layers", "norm", "eps", "n_heads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOfi", kwlist, &layers, &norm, &eps, &n_heads)) return NULL;
    PyObject *seq = PySequence_Fast(layers, "layers must be a sequence");
    if (!seq) return NULL;
    PlanObject *self = (PlanObject *)type->tp_alloc(type, 0);
    if (!self) goto fail;
    vlm_decoder *dec = &self->dec;
    const Py_ssize_t L = PySequence_Fast_GET_SIZE(seq);
    self->refs = PyList_New(0);
    self->layers = calloc(L ? L : 1, sizeof(vlm_layer));
    if (!self->refs || !self->layers) goto fail;
    dec->n_layers = (int)L;
    dec->n_heads = n_heads;
    dec->eps = eps;
    dec->layers = self->layers;
    if (L < 1 || n_heads < 1) {
        PyErr_SetString(PyExc_ValueError, "a plan needs at least one layer and one head");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < L; i++) {
        vlm_layer *l = &self->layers[i];
        PyObject *norm_in, *norm_post, *ms, *bs;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OOOO", &norm_in, &norm_post, &ms, &bs)) goto fail;
        if (!PyTuple_Check(ms) || !PyTuple_Check(bs) || PyTuple_GET_SIZE(ms) != W_COUNT ||
            PyTuple_GET_SIZE(bs) != W_COUNT) {
            PyErr_SetString(PyExc_ValueError, "a layer needs 7 matrices and 7 biases");
            goto fail;
        }
        for (int w = 0; w < W_COUNT; w++) {
            PyObject *mo = PyTuple_GET_ITEM(ms, w);
            if (!PyObject_TypeCheck(mo, &MatrixType)) {
                PyErr_SetString(PyExc_TypeError, "a layer's matrices must be prepared Matrices");
                goto fail;
            }
            if (PyList_Append(self->refs, mo)) goto fail;
            l->w[w] = &((MatrixObject *)mo)->m;
        }
        if (i == 0) { /* the shapes of the first layer, checked against every layer below */
            dec->hidden = l->w[W_Q]->cols;
            dec->inter = l->w[W_GATE]->rows;
            dec->head_dim = l->w[W_Q]->rows / n_heads;
            dec->n_kv = dec->head_dim ? l->w[W_K]->rows / dec->head_dim : 0;
            if (l->w[W_Q]->rows % n_heads || dec->head_dim % 2 || dec->head_dim > VLM_MAX_HEAD_DIM || dec->n_kv < 1 ||
                n_heads % dec->n_kv) {
                PyErr_SetString(PyExc_ValueError, "the layers and heads do not agree");
                goto fail;
            }
        }
        const int H = dec->hidden, FF = dec->inter, QD = n_heads * dec->head_dim, KD = dec->n_kv * dec->head_dim;
        const int rows[W_COUNT] = {QD, KD, KD, H, FF, FF, H}, cols[W_COUNT] = {H, H, H, QD, H, H, FF};
        for (int w = 0; w < W_COUNT; w++) {
            if (l->w[w]->rows != rows[w] || l->w[w]->cols != cols[w]) {
                PyErr_Format(PyExc_ValueError, "layer %zd: matrix %d is %dx%d, expected %dx%d", i, w, l->w[w]->rows,
                             l->w[w]->cols, rows[w], cols[w]);
                goto fail;
            }
            if (plan_vector(self->refs, PyTuple_GET_ITEM(bs, w), rows[w], 1, &l->bias[w])) goto fail;
        }
        if (plan_vector(self->refs, norm_in, H, 0, &l->norm_in) || plan_vector(self->refs, norm_post, H, 0, &l->norm_post))
            goto fail;
    }
    if (plan_vector(self->refs, norm, dec->hidden, 0, &dec->norm)) goto fail;
    Py_DECREF(seq);
    return (PyObject *)self;
fail:
    Py_DECREF(seq);
    Py_XDECREF(self);
    return NULL;
}

/* step(x, cos, sin, k_caches, v_caches, slots) -> the final-normed hidden states [n, hidden]:
 * row r of x [n, hidden] is one token, cos/sin [n, head_dim] of its position, written to
 * slot slots[r] of k_caches[r] / v_caches[r] and attending to that cache's slots 0..slots[r]. */
static PyObject *plan_step(PlanObject *self, PyObject *args) {
    PyObject *xo, *co, *so, *ko, *vo, *po;
    if (!PyArg_ParseTuple(args, "OOOOOO", &xo, &co, &so, &ko, &vo, &po)) return NULL;
    vlm_decoder *dec = &self->dec;
    /* tuples hold the caches alive while the step runs without the GIL */
    PyObject *ks = PySequence_Tuple(ko), *vs = ks ? PySequence_Tuple(vo) : NULL, *ps = vs ? PySequence_Tuple(po) : NULL;
    PyArrayObject *x = ps ? as_contiguous(xo) : NULL, *c = x ? as_contiguous(co) : NULL, *s = c ? as_contiguous(so) : NULL;
    PyArrayObject *out = NULL;
    vlm_kv_slot *kv = NULL;
    if (!s) goto done;
    const Py_ssize_t n = PyTuple_GET_SIZE(ks);
    if (n < 1 || PyTuple_GET_SIZE(vs) != n || PyTuple_GET_SIZE(ps) != n || PyArray_SIZE(x) != n * dec->hidden ||
        PyArray_SIZE(c) != n * dec->head_dim || PyArray_SIZE(s) != n * dec->head_dim) {
        PyErr_Format(PyExc_ValueError, "step needs n >= 1 caches and slots, x of n * %d values, cos and sin of n * %d",
                     dec->hidden, dec->head_dim);
        goto done;
    }
    kv = malloc(sizeof(vlm_kv_slot) * n);
    if (!kv) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *first = PyTuple_GET_ITEM(ks, 0);
    const int type = PyArray_Check(first) ? PyArray_TYPE((PyArrayObject *)first) : -1; /* every cache's */
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *k = PyTuple_GET_ITEM(ks, r), *v = PyTuple_GET_ITEM(vs, r);
        if (plan_cache(dec, k, type) || plan_cache(dec, v, type)) goto done;
        if (!PyArray_SAMESHAPE((PyArrayObject *)k, (PyArrayObject *)v)) {
            PyErr_SetString(PyExc_ValueError, "a sequence's k and v caches differ in shape");
            goto done;
        }
        const long pos = PyLong_AsLong(PyTuple_GET_ITEM(ps, r));
        const npy_intp max_len = PyArray_DIM((PyArrayObject *)k, 2);
        if (pos == -1 && PyErr_Occurred()) goto done;
        if (pos < 0 || pos >= max_len) {
            PyErr_Format(PyExc_ValueError, "slot %ld is outside its cache of %zd", pos, (Py_ssize_t)max_len);
            goto done;
        }
        kv[r] = (vlm_kv_slot){PyArray_DATA((PyArrayObject *)k), PyArray_DATA((PyArrayObject *)v), (int)max_len, (int)pos};
    }
    const npy_intp dims[2] = {n, dec->hidden};
    out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!out) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = vlm_decode_step(path, mode, dec, (int)n, PyArray_DATA(x), PyArray_DATA(c), PyArray_DATA(s), kv,
                         type == NPY_FLOAT16, PyArray_DATA(out));
    Py_END_ALLOW_THREADS;
    if (rc) {
        Py_CLEAR(out);
        PyErr_NoMemory();
    }
done:
    free(kv);
    Py_XDECREF(ks);
    Py_XDECREF(vs);
    Py_XDECREF(ps);
    Py_XDECREF(x);
    Py_XDECREF(c);
    Py_XDECREF(s);
    return (PyObject *)out;
}

static PyMethodDef plan_methods[] = {
    {"step", (PyCFunction)plan_step, METH_VARARGS,
     "step(x, cos, sin, k_caches, v_caches, slots) -> final-normed hidden [n, hidden] of one token of each of n "
     "sequences, row r at slot slots[r] of its caches"},
    {NULL},
};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vlm.kernels._native.DecoderPlan",
    .tp_basicsize = sizeof(PlanObject),
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A Llama / Qwen2 decoder's packed layers, for the fused (batched) decode step.",
    .tp_new = plan_new,
    .tp_methods = plan_methods,
};

/* ---- knobs ------------------------------------------------------------------------- */

#ifdef VLM_X86
/* AVX-VNNI (CPUID leaf 7, subleaf 1, EAX bit 4): GCC 12's __builtin_cpu_supports does not know it. */
static int has_avx_vnni(void) {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 4 & 1);
}
#endif

static const vlm_path *find_path(const char *name) {
    if (!strcmp(name, "portable")) return &vlm_path_portable;
#ifdef VLM_X86
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (!strcmp(name, "avx2") && avx2) return &vlm_path_avx2;
    if (!strcmp(name, "avxvnni") && avx2 && has_avx_vnni()) return &vlm_path_avxvnni;
    if (!strcmp(name, "avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return &vlm_path_avx512;
#endif
#ifdef VLM_ARM64
    return vlm_arm_path(name);
#else
    return NULL;
#endif
}

static const char *const path_order[] = {"avx512", "avxvnni", "avx2", "i8mm", "dotprod", "neon", "portable"};

static PyObject *supported_paths(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(unused)) {
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out && i < sizeof path_order / sizeof *path_order; i++) {
        if (!find_path(path_order[i])) continue;
        PyObject *s = PyUnicode_FromString(path_order[i]);
        if (!s || PyList_Append(out, s)) Py_CLEAR(out);
        Py_XDECREF(s);
    }
    return out;
}

/* set_path(name): a name of path_order; ValueError when this CPU lacks it. */
static PyObject *set_path(PyObject *Py_UNUSED(mod), PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    const vlm_path *p = find_path(name);
    if (!p) return PyErr_Format(PyExc_ValueError, "kernel path %s is not available on this CPU", name);
    path = p;
    Py_RETURN_NONE;
}

static PyObject *get_path(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(unused)) { return PyUnicode_FromString(path->name); }

static PyObject *set_mode(PyObject *Py_UNUSED(mod), PyObject *arg) {
    const long m = PyLong_AsLong(arg);
    if (m == -1 && PyErr_Occurred()) return NULL;
    if (m < 0 || m >= MODE_COUNT) return PyErr_Format(PyExc_ValueError, "no mode %ld", m);
    mode = (int)m;
    Py_RETURN_NONE;
}

static PyObject *get_mode(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(unused)) { return PyLong_FromLong(mode); }

static PyObject *set_threads(PyObject *Py_UNUSED(mod), PyObject *arg) {
    const long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) return PyErr_Format(PyExc_ValueError, "threads must be in 1..1024, got %ld", n);
    Py_BEGIN_ALLOW_THREADS;
    vlm_pool_set_threads((int)n);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* Hands the heap's free pages back to the OS (glibc only): loading frees many transient
 * blocks, which keep_freed_memory's policy below would otherwise keep resident. */
static PyObject *release_free_memory(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(unused)) {
#ifdef __GLIBC__
    Py_BEGIN_ALLOW_THREADS;
    malloc_trim(0);
    Py_END_ALLOW_THREADS;
#endif
    Py_RETURN_NONE;
}

static PyObject *get_threads(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(unused)) { return PyLong_FromLong(vlm_pool_threads()); }

static PyMethodDef methods[] = {
    {"pack_quant", pack_quant, METH_VARARGS,
     "pack_quant(qweight, scales, mins, kind, group_size, int8_activations=False, drop_source_pages=False)"},
    {"pack_half", pack_half, METH_VARARGS, "pack_half(data, kind, drop_source_pages=False)"},
    {"unpack_rows", unpack_rows, METH_VARARGS, "unpack_rows(matrix, ids) -> float32 rows"},
    {"release_free_memory", release_free_memory, METH_NOARGS, "malloc_trim: return free heap pages to the OS"},
    {"linear", (PyCFunction)(void (*)(void))linear, METH_FASTCALL, "linear(x, matrix) -> x @ W.T"},
    {"linears", (PyCFunction)(void (*)(void))linears, METH_FASTCALL,
     "linears(x, matrices) -> (x @ W.T, ...), x's activations prepared once"},
    {"attention", attention, METH_VARARGS, "attention(q, k, v, causal_offset) -> o"},
    {"rms_norm", rms_norm, METH_VARARGS, "rms_norm(x, weight, eps) -> y"},
    {"swiglu", swiglu, METH_VARARGS, "swiglu(gate, up) -> silu(gate) * up"},
    {"rotary", rotary, METH_VARARGS, "rotary(x, cos, sin) -> x * cos + rotate_half(x) * sin"},
    {"store_half", store_half, METH_VARARGS, "store_half(dst, src): dst[...] = src as float16"},
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

/* A forward pass allocates and frees activations of a few MB per op (numpy temporaries, the
 * kernels' outputs). With glibc's default policy the heap is trimmed as they are freed and
 * every chunk of a prefill faults them in again: a quarter to half of prefill time, measured
 * on SmolLM2-135M. Blocks up to 32 MiB come from the heap and up to 64 MiB of freed heap stays
 * mapped, as a runtime's own compute buffers would. */
static void keep_freed_memory(void) {
#ifdef __GLIBC__
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
#endif
}

PyMODINIT_FUNC PyInit__native(void) {
    import_array();
    keep_freed_memory();
    if (PyType_Ready(&MatrixType) < 0 || PyType_Ready(&PlanType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    Py_INCREF(&MatrixType);
    Py_INCREF(&PlanType);
    if (PyModule_AddObject(mod, "Matrix", (PyObject *)&MatrixType) < 0 ||
        PyModule_AddObject(mod, "DecoderPlan", (PyObject *)&PlanType) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_HEAD_DIM", VLM_MAX_HEAD_DIM) < 0 ||
        PyModule_AddIntConstant(mod, "SOLO_TOKENS", VLM_SOLO_TOKENS) < 0) {
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
