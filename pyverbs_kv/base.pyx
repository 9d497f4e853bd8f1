"""Errors, the close-ordering base class and process-wide set-up shared by
every verbs object."""
import errno as _errno
import os
import resource
import weakref

from pyverbs_kv.libibverbs cimport ibv_fork_init

cdef bint _fork_initialized = False


class VerbsError(Exception):
    """A verbs or rdma_cm call failed. ``errno`` is the C error number (0 if
    the call gave none) and ``call`` names the failing step."""

    def __init__(self, call, errno=0, detail=""):
        self.call = call
        self.errno = errno
        self.detail = detail
        msg = f"{call} failed"
        if errno:
            msg += f": [errno {errno}] {os.strerror(errno)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class VerbsTimeout(VerbsError):
    """A wait reached its deadline before the event or completion came."""

    def __init__(self, call, detail=""):
        super().__init__(call, _errno.ETIMEDOUT, detail)


class CompletionError(VerbsError):
    """A work request completed with an error status. ``status`` is the
    ibv_wc_status value, ``status_str`` its ibv_wc_status_str text."""

    def __init__(self, call, status, status_str, wr_id, opcode, vendor_err, qp_num,
                 detail=""):
        self.status = status
        self.status_str = status_str
        self.wr_id = wr_id
        self.opcode = opcode
        self.vendor_err = vendor_err
        self.qp_num = qp_num
        text = (f"work completion error '{status_str}' (status {status}, vendor_err "
                f"{vendor_err:#x}) on QP {qp_num:#x}, opcode {opcode}, wr_id {wr_id:#x}")
        if detail:
            text += f"; {detail}"
        super().__init__(call, _errno.EIO, text)


cdef raise_errno(str call, int err, str detail=""):
    raise VerbsError(call, err, detail)


def memlock_limit():
    """The soft RLIMIT_MEMLOCK in bytes, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def memlock_advice(length):
    """A sentence explaining how RLIMIT_MEMLOCK may have made registering
    ``length`` bytes fail, with the fix."""
    limit = memlock_limit()
    if limit is None:
        return "RLIMIT_MEMLOCK is unlimited, so the lock limit is not the cause"
    return (f"RLIMIT_MEMLOCK is {limit} bytes and this registration needs {length}; "
            "raise it with 'ulimit -l unlimited' (or LimitMEMLOCK=infinity for systemd, "
            "--ulimit memlock=-1 for docker, memlock in /etc/security/limits.conf)")


def fork_init():
    """Make registered memory safe across fork(). Called before the first
    device is opened; idempotent. Worker processes should still be started
    with the 'spawn' method."""
    global _fork_initialized
    if _fork_initialized:
        return
    cdef int rc = ibv_fork_init()
    if rc != 0:
        raise VerbsError("ibv_fork_init", rc)
    _fork_initialized = True


cdef class PyverbsObject:
    """Owns a verbs resource. Parents keep weak references to the objects
    created from them and close those first, so a resource is never destroyed
    while something built on it is alive. ``close()`` is idempotent."""

    def __cinit__(self, *args, **kwargs):
        self._children = weakref.WeakValueDictionary()
        self._child_seq = 0

    cdef add_child(self, child):
        self._child_seq += 1
        self._children[self._child_seq] = child

    cdef close_children(self):
        # QPs before anything else (their WRs may use the PD's MRs), then
        # newest first.
        live = [(getattr(c, "close_rank", 1), -k, c) for k, c in list(self._children.items())]
        live.sort(key=lambda item: item[:2])
        for _, _, child in live:
            child.close()
        self._children.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        raise NotImplementedError
