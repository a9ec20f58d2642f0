/* The hot loops of watcher_bitcoin.rawblock in C: finding candidate output scripts in a
 * serialized block, and walking its transactions to the outputs that start at given places.
 *
 * Optional: when this module cannot be built, rawblock runs the same in Python (and the tests
 * compare the two on real blocks and on damaged ones). Every read is bounds-checked against
 * the buffer; a block that ends early is a ValueError, as in Python. Nothing here hashes: the
 * walk returns where each transaction's parts lie, and Python computes the txids of the few
 * that pay a watched script.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

typedef struct {
    const unsigned char *b;
    Py_ssize_t len;
    Py_ssize_t p;
    const char *error; /* set when the data ended early or is malformed */
} Reader;

/* a compact size; 0 and r->error set if the data ends inside it */
static uint64_t compact(Reader *r) {
    if (r->p >= r->len) {
        r->error = "truncated block";
        return 0;
    }
    unsigned char n = r->b[r->p];
    if (n < 0xFD) {
        r->p += 1;
        return n;
    }
    int size = n == 0xFD ? 2 : n == 0xFE ? 4 : 8;
    if (r->len - r->p - 1 < size) {
        r->error = "truncated compact size";
        return 0;
    }
    uint64_t v = 0;
    for (int i = size - 1; i >= 0; i--)
        v = (v << 8) | r->b[r->p + 1 + i];
    r->p += 1 + size;
    return v;
}

/* move on ``n`` bytes; an error if that passes the end */
static void skip(Reader *r, uint64_t n) {
    if (r->error)
        return;
    if (n > (uint64_t)(r->len - r->p)) {
        r->error = "truncated block";
        return;
    }
    r->p += (Py_ssize_t)n;
}

static int need(Reader *r, Py_ssize_t n) {
    if (r->error)
        return 0;
    if (r->len - r->p < n) {
        r->error = "truncated block";
        return 0;
    }
    return 1;
}

/* scripts(data, prefix, length, into[, within]): add to the set ``into`` every ``length``-byte
 * run of ``data`` that follows a byte equal to prefix[0] and starts with prefix[1:] (an output
 * script of one shape with its length byte), at every offset, overlapping ones included; only
 * those in the set ``within``, if given. */
static PyObject *scripts(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data, prefix;
    Py_ssize_t length;
    PyObject *into, *within = NULL;
    if (!PyArg_ParseTuple(args, "y*y*nO!|O!", &data, &prefix, &length, &PySet_Type, &into, &PySet_Type, &within))
        return NULL;
    PyObject *result = NULL;
    const unsigned char *b = data.buf, *pre = prefix.buf;
    Py_ssize_t n = data.len, plen = prefix.len;
    if (plen < 1 || length < plen - 1) {
        PyErr_SetString(PyExc_ValueError, "a prefix of 1 to length + 1 bytes");
        goto done;
    }
    Py_ssize_t i = 0;
    while (n - i >= 1 + length) {
        const unsigned char *at = memchr(b + i, pre[0], (size_t)(n - i - length));
        if (at == NULL)
            break;
        i = at - b;
        if (memcmp(at + 1, pre + 1, (size_t)(plen - 1)) == 0) {
            PyObject *s = PyBytes_FromStringAndSize((const char *)at + 1, length);
            int wanted = s == NULL ? -1 : within == NULL ? 1 : PySet_Contains(within, s);
            if (wanted < 0 || (wanted && PySet_Add(into, s) < 0)) {
                Py_XDECREF(s);
                goto done;
            }
            Py_DECREF(s);
        }
        i += 1;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&prefix);
    return result;
}

static int cmp_ssize(const void *a, const void *b) {
    Py_ssize_t x = *(const Py_ssize_t *)a, y = *(const Py_ssize_t *)b;
    return (x > y) - (x < y);
}

/* walk(block, places): the outputs of the serialized ``block`` whose script (after its
 * one-byte length) starts at one of ``places`` (a sequence of offsets), walking the
 * transactions up to the one holding the last place. A list of tuples
 *   (tx number, output index, value, script start, script length,
 *    tx start, body start, body end, tx end)
 * where the txid is the double SHA-256 of tx[start:start+4] + tx[body:body_end] + tx[end-4:end].
 * A transaction with a segwit flag other than 1 gives the flag (an int) instead of a list. */
static PyObject *walk(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data;
    PyObject *places_obj;
    if (!PyArg_ParseTuple(args, "y*O", &data, &places_obj))
        return NULL;
    PyObject *out = NULL, *seq = NULL;
    Py_ssize_t *places = NULL;
    seq = PySequence_Fast(places_obj, "places must be a sequence of offsets");
    if (seq == NULL)
        goto fail;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    out = PyList_New(0);
    if (out == NULL)
        goto fail;
    if (count == 0)
        goto done;
    places = PyMem_New(Py_ssize_t, count);
    if (places == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        places[k] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, k));
        if (places[k] == -1 && PyErr_Occurred())
            goto fail;
    }
    qsort(places, (size_t)count, sizeof(Py_ssize_t), cmp_ssize);
    Py_ssize_t last = places[count - 1], next = 0; /* places[next]: the first not passed yet */

    Reader r = {data.buf, data.len, 80, NULL};
    if (data.len < 81) {
        r.error = "truncated block";
        goto error;
    }
    uint64_t n_tx = compact(&r);
    for (uint64_t t = 0; t < n_tx && !r.error; t++) {
        if (r.p >= last)
            break;
        Py_ssize_t start = r.p;
        skip(&r, 4);
        if (!need(&r, 1))
            break;
        int segwit = r.b[r.p] == 0;
        if (segwit) {
            if (!need(&r, 2))
                break;
            if (r.b[r.p + 1] != 1) {
                long flag = r.b[r.p + 1];
                Py_CLEAR(out);
                out = PyLong_FromLong(flag);
                goto done;
            }
            r.p += 2;
        }
        Py_ssize_t body = r.p;
        uint64_t n_in = compact(&r);
        if (r.error)
            break;
        if (n_in == 0) {
            r.error = "a transaction without inputs";
            break;
        }
        for (uint64_t i = 0; i < n_in && !r.error; i++) {
            skip(&r, 36);
            uint64_t n = r.error ? 0 : compact(&r);
            skip(&r, n);
            skip(&r, 4);
        }
        uint64_t n_out = r.error ? 0 : compact(&r);
        Py_ssize_t first_hit = PyList_GET_SIZE(out);
        for (uint64_t i = 0; i < n_out && !r.error; i++) {
            if (!need(&r, 9))
                break;
            Py_ssize_t value_at = r.p;
            r.p += 8;
            int short_len = r.b[r.p] < 0xFD;
            uint64_t n = compact(&r);
            if (r.error)
                break;
            Py_ssize_t script = r.p;
            skip(&r, n);
            if (r.error)
                break;
            /* a long script (its length written in 3+ bytes) never matches: the byte before
             * it is its length's last byte, which may look like a short script's length */
            while (next < count && places[next] < script)
                next++;
            if (short_len && next < count && places[next] == script) {
                uint64_t value = 0;
                for (int k = 7; k >= 0; k--)
                    value = (value << 8) | r.b[value_at + k];
                PyObject *hit = Py_BuildValue("(KKKnn)", (unsigned long long)t, (unsigned long long)i,
                                              (unsigned long long)value, script, (Py_ssize_t)n);
                if (hit == NULL || PyList_Append(out, hit) < 0) {
                    Py_XDECREF(hit);
                    goto fail;
                }
                Py_DECREF(hit);
            }
        }
        if (r.error)
            break;
        Py_ssize_t body_end = r.p;
        if (segwit) {
            for (uint64_t i = 0; i < n_in && !r.error; i++) {
                uint64_t items = compact(&r);
                for (uint64_t k = 0; k < items && !r.error; k++)
                    skip(&r, compact(&r));
            }
        }
        skip(&r, 4);
        if (r.error)
            break;
        /* the transaction's parts, appended to each of its hits */
        for (Py_ssize_t k = first_hit; k < PyList_GET_SIZE(out); k++) {
            PyObject *hit = PyList_GET_ITEM(out, k);
            PyObject *whole = Py_BuildValue("(OOOOOnnnn)", PyTuple_GET_ITEM(hit, 0), PyTuple_GET_ITEM(hit, 1),
                                            PyTuple_GET_ITEM(hit, 2), PyTuple_GET_ITEM(hit, 3),
                                            PyTuple_GET_ITEM(hit, 4), start, body, body_end, r.p);
            if (whole == NULL)
                goto fail;
            PyList_SET_ITEM(out, k, whole); /* steals whole; drop the short tuple */
            Py_DECREF(hit);
        }
    }
error:
    if (r.error) {
        PyErr_SetString(PyExc_ValueError, r.error);
        goto fail;
    }
done:
    PyMem_Free(places);
    Py_XDECREF(seq);
    PyBuffer_Release(&data);
    return out;
fail:
    PyMem_Free(places);
    Py_XDECREF(seq);
    Py_XDECREF(out);
    PyBuffer_Release(&data);
    return NULL;
}

/* hex text to bytes, for the node's answers (a serialized block is ~60 KB of hex): one
 * lookup a pair of characters in a table of every pair (128 KB, built at import), and the
 * GIL released meanwhile. binascii.unhexlify checks each character on its own and
 * takes ~36 µs a block of 120 transactions, this ~13
 * (SSE2, on every x86-64; the table elsewhere). Upper and lower case, as binascii. */
#define NOT_HEX 0x100
static uint16_t pair_value[65536];

static int hex_digit(int c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static void fill_pairs(void) {
    for (int hi = 0; hi < 256; hi++)
        for (int lo = 0; lo < 256; lo++) {
            int a = hex_digit(hi), b = hex_digit(lo);
            pair_value[hi << 8 | lo] = a < 0 || b < 0 ? NOT_HEX : (uint16_t)(a << 4 | b);
        }
}

#ifdef __SSE2__
/* 16 bytes from 32 characters a round, in SSE2 (every x86-64 has it): each character's
 * nibble by compares and masks, then the pairs joined by shifts and packed. Returns
 * whether a character was not a hex digit. */
static int unhex_sse2(const unsigned char *s, unsigned char *o, Py_ssize_t rounds) {
    const __m128i below0 = _mm_set1_epi8('0' - 1), above9 = _mm_set1_epi8('9' + 1);
    const __m128i belowa = _mm_set1_epi8('a' - 1), abovef = _mm_set1_epi8('f' + 1);
    const __m128i lower = _mm_set1_epi8(0x20), zero = _mm_set1_epi8('0'), ten = _mm_set1_epi8('a' - 10);
    const __m128i low_byte = _mm_set1_epi16(0x00FF);
    __m128i valid = _mm_set1_epi8(-1);
    for (Py_ssize_t r = 0; r < rounds; r++) {
        __m128i packed[2];
        for (int h = 0; h < 2; h++) {
            __m128i c = _mm_loadu_si128((const __m128i *)(s + 32 * r + 16 * h));
            __m128i digit = _mm_and_si128(_mm_cmpgt_epi8(c, below0), _mm_cmplt_epi8(c, above9));
            __m128i l = _mm_or_si128(c, lower);
            __m128i letter = _mm_and_si128(_mm_cmpgt_epi8(l, belowa), _mm_cmplt_epi8(l, abovef));
            valid = _mm_and_si128(valid, _mm_or_si128(digit, letter));
            __m128i nib = _mm_or_si128(_mm_and_si128(digit, _mm_sub_epi8(c, zero)),
                                       _mm_and_si128(letter, _mm_sub_epi8(l, ten)));
            /* each 16 bits: the first character's nibble low, the second's high */
            packed[h] = _mm_and_si128(_mm_or_si128(_mm_slli_epi16(nib, 4), _mm_srli_epi16(nib, 8)), low_byte);
        }
        _mm_storeu_si128((__m128i *)(o + 16 * r), _mm_packus_epi16(packed[0], packed[1]));
    }
    return _mm_movemask_epi8(valid) != 0xFFFF;
}
#endif

static PyObject *unhex(PyObject *self, PyObject *arg) {
    Py_buffer text;
    if (PyObject_GetBuffer(arg, &text, PyBUF_SIMPLE) < 0)
        return NULL;
    if (text.len % 2) {
        PyBuffer_Release(&text);
        PyErr_SetString(PyExc_ValueError, "hex text of odd length");
        return NULL;
    }
    Py_ssize_t n = text.len / 2;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL) {
        PyBuffer_Release(&text);
        return NULL;
    }
    const unsigned char *s = text.buf;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned bad = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
#ifdef __SSE2__
    bad = unhex_sse2(s, o, n / 16) ? NOT_HEX : 0;
    i = n / 16 * 16;
#endif
    for (; i < n; i++) {
        uint16_t v = pair_value[s[2 * i] << 8 | s[2 * i + 1]];
        bad |= v;
        o[i] = (unsigned char)v;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&text);
    if (bad & NOT_HEX) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_ValueError, "not hex text");
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"scripts", scripts, METH_VARARGS, "Add every script of one shape found in data (and in a set, if given) to a set."},
    {"walk", walk, METH_VARARGS, "The outputs of a serialized block whose scripts start at given offsets."},
    {"unhex", unhex, METH_O, "Hex text (any buffer) as bytes; ValueError if it is not hex of even length."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rawscan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rawscan(void) {
    fill_pairs();
    return PyModule_Create(&module);
}
