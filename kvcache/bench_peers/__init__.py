"""Other transfer engines in ``kvcache bench --peers``: the bench's batches
(``batch`` scattered blocks per size, one thread, the same descriptor lists
as its own cells) moved by Mooncake's transfer engine and by NIXL between
two processes on 127.0.0.1, measured with the bench's own ``measure`` and
memcpy baseline so their rows read like ours.

One module per peer (``mooncake_te``, ``nixl_ucx``), each with the same
shape: ``NAME``, ``PIP`` (what to install), ``MODULE`` (what must import),
``VARIANTS`` (transport label -> environment for both processes),
``OURS`` (a variant -> which of our transports its rows compare with),
``target_main(conn, nbytes, fill)`` (the serving process) and
``Initiator(conn, nbytes, fill)`` (this process's side: ``batch(op, local,
remote, lengths)`` returns a callable moving one batch, ``close()``).

Peers are an optional extra (``pip install .[peers]`` and ``nixl-cu12``
without its dependencies; ``make bench-peers``): only ``--peers`` loads them."""
import contextlib
import importlib.util
import multiprocessing as mp
import os

import numpy as np

from kvcache.descriptors import block_descriptors

from . import mooncake_te, nixl_ucx

PEERS = {m.NAME: m for m in (mooncake_te, nixl_ucx)}
FILL = 0xA5                        # every block on both sides; a read must bring it back
HELLO_TIMEOUT_S = 120


def missing(names):
    """One line naming what to install for the peers in ``names`` that do
    not import here, or None when all do."""
    lacking = [PEERS[n] for n in names if not _importable(PEERS[n].MODULE)]
    if not lacking:
        return None
    return ("--peers needs " + "; ".join(f"{m.NAME}: {m.PIP}" for m in lacking)
            + " (or `make bench-peers`)")


def _importable(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:            # a parent package that is not there
        return False


def cell_count(names, sizes, ops):
    return sum(len(PEERS[n].VARIANTS) for n in names) * len(sizes) * len(ops)


def run_peers(names, sizes, ops, batch, seconds, measure, memcpy_batch, progress):
    """Rows for every peer variant, size and op. ``measure`` and
    ``memcpy_batch`` are the bench's own (kvcache.bench), so a peer cell is
    timed and compared exactly like ours."""
    rows = []
    for name in names:
        peer = PEERS[name]
        for transport, env in peer.VARIANTS.items():
            with _environment(env):
                rows += _run_variant(peer, transport, sizes, ops, batch, seconds, measure,
                                     memcpy_batch, progress)
    return rows


def _run_variant(peer, transport, sizes, ops, batch, seconds, measure, memcpy_batch,
                 progress):
    nbytes = 2 * batch * max(sizes)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    target = ctx.Process(target=peer.target_main, args=(child_conn, nbytes, FILL), daemon=True)
    target.start()
    child_conn.close()
    rows = []
    initiator = None
    try:
        if not conn.poll(HELLO_TIMEOUT_S):
            raise SystemExit(f"kvcache bench: {peer.NAME} target sent nothing in "
                             f"{HELLO_TIMEOUT_S} s")
        initiator = peer.Initiator(conn, nbytes, FILL)
        for size in sizes:
            # The bench's own scattered blocks (kvcache.bench.run_transport,
            # one thread): the same seed gives the same block ids.
            rng = np.random.default_rng(size)
            src = rng.permutation(2 * batch)[:batch]
            dst = rng.permutation(2 * batch)[:batch]
            local, remote, lengths = block_descriptors([initiator.local_base], size, dst,
                                                       [initiator.remote_base], size, src)
            blocks = initiator.local[:2 * batch * size].reshape(2 * batch, size)
            baseline = memcpy_batch(size, batch)
            for op in ops:
                run_batch = initiator.batch(op, local, remote, lengths)
                label = f"{peer.NAME} {transport} {op} {size // 1024}K"
                if op == "read":
                    blocks[dst] = 0
                cell = measure(lambda _: run_batch(), batch * size, seconds, 1, baseline)
                if op == "read" and not (blocks[dst] == FILL).all():
                    raise SystemExit(f"kvcache bench: {label} left wrong bytes in the blocks "
                                     "it read")
                rows.append(dict(transport=transport, path=peer.NAME, op=op, block=size,
                                 threads=1, **cell))
                progress.step(label)
            del baseline               # its two buffers go before the next size's
    except BaseException:
        target.kill()
        raise
    finally:
        if initiator is not None:
            initiator.close()
        conn.close()                       # the target's recv sees EOF and it exits
        target.join(30)
        if target.is_alive():
            target.kill()
            target.join(5)
    return rows


def render_versus(rows):
    """Markdown lines after the bench table: per peer variant and op, our
    engine's GB/s divided by the peer's at each block size (one thread), or
    "" when no peer ran."""
    peers = [r for r in rows if r["path"] in PEERS]
    if not peers:
        return ""
    ours = {(r["transport"], r["op"], r["block"]): r["GBps"] for r in rows
            if r["path"] == "engine" and r["threads"] == 1}
    sizes = sorted({r["block"] for r in peers})
    lines = ["", "Ours vs peers, one thread, the same blocks: our engine's GB/s divided by the "
             "peer's (above 1: ours is faster).", "",
             "| ours | peer | op | " + " | ".join(f"{s // 1024} KiB" for s in sizes) + " |",
             "|---|---|---|" + "---|" * len(sizes)]
    for path, transport, op in dict.fromkeys((r["path"], r["transport"], r["op"]) for r in peers):
        mine = PEERS[path].OURS.get(transport, transport)
        theirs = {r["block"]: r["GBps"] for r in peers
                  if (r["path"], r["transport"], r["op"]) == (path, transport, op)}
        cells = [f"{ours[(mine, op, s)] / theirs[s]:.1f}x"
                 if (mine, op, s) in ours and theirs.get(s) else "-" for s in sizes]
        lines.append(f"| {mine} engine | {path} {transport} | {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def _environment(env):
    """``env`` set for the target (spawned inside) and this process's
    initiator (the libraries read it when they create their context)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
