"""Child processes that end with their parent (Linux PR_SET_PDEATHSIG): the
bench's workers, the demo's servers and the examples' processes, so that
an interrupted or killed parent leaves nothing running."""
import ctypes
import multiprocessing as mp
import os
import signal

PR_SET_PDEATHSIG = 1                 # <sys/prctl.h>


def die_with_parent(parent_pid):
    """In a child: the kernel sends SIGKILL when the parent dies (any way:
    SIGKILL, a crash). ``parent_pid``: the pid the parent gave; a child
    whose parent already died before this call exits at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


def worker_dies_with_parent():
    """In a multiprocessing worker: Ctrl-C reaches the whole process group,
    but only the parent handles it (it ends its workers); and the worker
    dies with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = mp.parent_process()
    die_with_parent(parent.pid if parent is not None else os.getppid())
