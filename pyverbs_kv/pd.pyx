"""Protection domains."""
from libc.errno cimport errno
from pyverbs_kv.base import VerbsError
from pyverbs_kv.device cimport Context
from pyverbs_kv.libibverbs cimport ibv_alloc_pd, ibv_dealloc_pd



cdef class PD(PyverbsObject):
    """A protection domain. Register each memory pool once per PD."""

    def __init__(self, Context ctx not None):
        ctx.check_open()
        self.pd = ibv_alloc_pd(ctx.ctx)
        if self.pd == NULL:
            raise VerbsError("ibv_alloc_pd", errno, ctx.name)
        self.ctx = ctx
        ctx.add_child(self)

    def close(self):
        if self.pd == NULL:
            return
        self.close_children()
        rc = ibv_dealloc_pd(self.pd)
        self.pd = NULL
        if rc != 0:
            raise VerbsError("ibv_dealloc_pd", rc)

    def __dealloc__(self):
        if self.pd != NULL:
            ibv_dealloc_pd(self.pd)
            self.pd = NULL

    cdef check_open(self):
        if self.pd == NULL:
            raise VerbsError("PD", 0, "the protection domain is closed")
