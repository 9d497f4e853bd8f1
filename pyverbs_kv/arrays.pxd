# Descriptor arrays as the C kernels read them: contiguous 1-D arrays of one
# integer type, through raw pointers (typed memoryviews cost more to set up
# than a kernel spends on a thousand pieces). A module that cimports this
# calls cnp.import_array() once.
cimport numpy as cnp
import numpy as np
from libc.stdint cimport uint64_t


cdef inline bint _plain(values, int type_num):
    if not cnp.PyArray_Check(values):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>values
    return (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_TYPE(arr) == type_num
            and cnp.PyArray_ISCARRAY_RO(arr) and cnp.PyArray_ISNOTSWAPPED(arr))


cdef inline cnp.ndarray as_u64(values):
    """A contiguous 1-D uint64 array (no copy when it already is one)."""
    if _plain(values, cnp.NPY_UINT64):
        return <cnp.ndarray>values
    return np.ascontiguousarray(values, dtype=np.uint64).ravel()


cdef inline cnp.ndarray as_i64(values):
    if _plain(values, cnp.NPY_INT64):
        return <cnp.ndarray>values
    return np.ascontiguousarray(values, dtype=np.int64).ravel()


cdef inline uint64_t *data_of(cnp.ndarray arr) noexcept:
    return <uint64_t *>cnp.PyArray_DATA(arr)


cdef inline Py_ssize_t length_of(cnp.ndarray arr) noexcept:
    return cnp.PyArray_DIM(arr, 0)
