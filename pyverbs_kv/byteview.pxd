# A writable 1-D view of raw bytes, as the buffer protocol's consumers
# (numpy, memoryview, ctypes) take it: what every byte-holding object of
# this package exports from __getbuffer__.
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES


cdef inline void fill_byte_view(Py_buffer *view, object owner, void *buf, Py_ssize_t nbytes,
                                int flags):
    view.buf = buf
    view.obj = owner
    view.len = nbytes
    view.readonly = 0
    view.itemsize = 1
    view.format = <char *>"B" if flags & PyBUF_FORMAT else NULL
    view.ndim = 1
    # Shape and strides point into the view itself, as PyBuffer_FillInfo does.
    view.shape = &view.len if flags & PyBUF_ND else NULL
    view.strides = &view.itemsize if flags & PyBUF_STRIDES == PyBUF_STRIDES else NULL
    view.suboffsets = NULL
    view.internal = NULL
