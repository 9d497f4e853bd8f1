"""Memory regions."""
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE,
                             PyBUF_ANY_CONTIGUOUS)
from libc.errno cimport errno
from libc.stdint cimport uintptr_t

from pyverbs_kv.base import VerbsError, memlock_advice
from pyverbs_kv.libibverbs cimport ibv_reg_mr, ibv_dereg_mr, ibv_pd
from pyverbs_kv.libibverbs_enums cimport (IBV_ACCESS_LOCAL_WRITE, IBV_ACCESS_REMOTE_WRITE,
                                          IBV_ACCESS_REMOTE_READ)

DEFAULT_ACCESS = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ


cdef class MR(PyverbsObject):
    """A registered memory region over a writable, contiguous buffer (numpy
    array, bytearray, mmap, ...). The buffer stays exported, so it cannot be
    resized or freed while the MR lives."""

    def __init__(self, PD pd not None, buffer=None, int access=DEFAULT_ACCESS):
        if buffer is None:
            return      # MR.from_address fills the region in
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        self.has_view = True
        try:
            self._register(pd, <uintptr_t>self.view.buf, self.view.len, access)
        except BaseException:
            PyBuffer_Release(&self.view)
            self.has_view = False
            raise

    @classmethod
    def from_address(cls, PD pd not None, uintptr_t addr, size_t length,
                     int access=DEFAULT_ACCESS, owner=None):
        """Register raw memory. ``owner`` is kept alive as long as the MR."""
        cdef MR mr = cls(pd)
        mr._register(pd, addr, length, access)
        mr.owner = owner
        return mr

    def _register(self, PD pd, uintptr_t addr, size_t length, int access):
        pd.check_open()
        if length == 0:
            raise VerbsError("ibv_reg_mr", 0, "cannot register an empty buffer")
        cdef ibv_pd *c_pd = pd.pd
        cdef int err = 0
        with nogil:
            self.mr = ibv_reg_mr(c_pd, <void *>addr, length, access)
            if self.mr == NULL:
                err = errno
        if self.mr == NULL:
            raise VerbsError("ibv_reg_mr", err,
                             f"addr={addr:#x} length={length} access={access:#x}; "
                             + memlock_advice(length))
        self.pd = pd
        pd.add_child(self)

    def close(self):
        if self.mr != NULL:
            rc = ibv_dereg_mr(self.mr)
            self.mr = NULL
            if rc != 0:
                raise VerbsError("ibv_dereg_mr", rc)
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False
        self.owner = None

    def __dealloc__(self):
        if self.mr != NULL:
            ibv_dereg_mr(self.mr)
            self.mr = NULL
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False

    cdef check_open(self):
        if self.mr == NULL:
            raise VerbsError("MR", 0, "the memory region is closed")

    @property
    def lkey(self):
        self.check_open()
        return self.mr.lkey

    @property
    def rkey(self):
        self.check_open()
        return self.mr.rkey

    @property
    def addr(self):
        self.check_open()
        return <uintptr_t>self.mr.addr

    @property
    def length(self):
        self.check_open()
        return self.mr.length
