"""Lifetimes of registered memory and caches while transfers run.

The rules these tests hold the engine and the cache manager to:

- A region is pinned by every transfer that touches it, on both sides
  (initiator and target), from planning until the transfer completed or
  failed. ``unregister_memory``, ``deallocate_cache`` and ``unregister_cache``
  wait for the pins up to the deadline (the engine's timeout_ms /
  LLMConfig.sync_kv_timeout), then refuse with LLM_LINK_BUSY and leave the
  region / cache intact, registered and freeable later.
- A transfer that misses its deadline fails with LLM_TIMEOUT, and no byte of
  it lands afterwards.
- Once a cache key is removed or given to another cache, a peer's
  remembered lookup of it is not used: a pull by that key says
  LLM_KV_CACHE_NOT_EXIST (removed) or reads the new cache (given away).

A transfer is held in flight by freezing the process on the other side
(SIGSTOP, helpers.Freeze), by slowing it down while it stays alive
(helpers.Throttle: it runs 0.5 ms in every 50, so it still answers control
calls), or, where this process does the copying itself (the shared-memory
transport copies on the initiator), by its size. Each test checks that the
transfer is in flight before it frees, and fails (rather than passes) when
it finds the transfer ended too early to be raced. Memory freed too early
is caught by writing a known value into it (or into the cache that gets the
same memory next) right after the free returned, letting the transfer end,
and counting the bytes that changed. Only the shared-memory variants of the
pull tests (report 1) rest on timing alone: a 128 MiB copy (~30 ms here)
against the free's notice round trip to the peer (~1 ms).

Remote actions beyond tests/kv_peer.py are not needed; helpers.RawReader is
a second kind of peer process (a bare TransferEngine, no cache manager).
"""
import json
import time

import numpy as np
import pytest

from helpers import (Freeze, Outcome, RawReader, Throttle, as_bytes, block_view,
                     bytes_not_equal, fill_cache, wait_until, watchdog)
from kv_peer import PeerError, PeerProcess, pattern
from kvcache import (BlocksCacheKey, CacheDesc, CacheKey, DataType, LLMClusterInfo,
                     LLMConfig, LLMDataDist, LLMException, LLMRole, LLMStatusCode,
                     TransferEngine)

MiB = 1 << 20
TRANSPORTS = ["tcp", "shm"]
TEST_DEADLINE_S = 45          # watchdog per test; each runs in a few seconds
OK = None                     # Outcome.code of a transfer that succeeded


def pool(nbytes):
    return json.dumps({"buf_pool_size": nbytes})


def blocks_desc(num_tensors, nbytes_per_tensor, block_bytes):
    return CacheDesc(num_tensors, DataType.DT_FLOAT16,
                     [nbytes_per_tensor // block_bytes, block_bytes // 2])


class World:
    """Peer processes and in-process LLMDataDists of one test, torn down in
    an order that cannot hang: frozen peers are continued first."""

    def __init__(self):
        self.processes, self.freezes, self.throttles, self.local = [], [], [], []

    def spawn(self, role, cluster_id, **options):
        peer = PeerProcess(role, cluster_id, **options)
        self.processes.append(peer)
        return peer

    def freeze(self, peer):
        freeze = Freeze(peer)
        self.freezes.append(freeze)
        return freeze

    def throttle(self, peer):
        throttle = Throttle(peer)
        self.throttles.append(throttle)
        return throttle

    def raw_reader(self, transport, address, nbytes, timeout_ms):
        reader = RawReader(transport, address, nbytes, timeout_ms)
        self.processes.append(reader)
        return reader

    def datadist(self, role, cluster_id, transport, *, listen="127.0.0.1:0", pool_bytes,
                 sync_kv_timeout=1000, link_timeout=3000):
        dd = LLMDataDist(LLMRole(role), cluster_id)
        cfg = LLMConfig()
        cfg.listen_ip_info = listen
        cfg.transport = transport
        cfg.buf_pool_cfg = pool(pool_bytes)
        cfg.sync_kv_timeout = sync_kv_timeout
        cfg.link_timeout = link_timeout
        dd.init(cfg.generate_options())
        self.local.append(dd)
        return dd

    def close(self):
        for throttle in self.throttles:
            throttle.release()
        for freeze in self.freezes:
            freeze.resume()
        errors = []
        for close in [p.close for p in self.processes] + [d.finalize for d in self.local]:
            try:
                close()
            except Exception as exc:           # noqa: BLE001 - close the rest first
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def world():
    w = World()
    with watchdog(TEST_DEADLINE_S):
        try:
            yield w
        finally:
            w.close()


def link(dd, cluster_id, address):
    info = LLMClusterInfo()
    info.remote_cluster_id = cluster_id
    host, port = address.rsplit(":", 1)
    info.append_remote_ip_info(host, int(port))
    _, (status,) = dd.link_clusters([info], timeout=3000)
    assert status == LLMStatusCode.LLM_SUCCESS


def status_of(call, *args, **kwargs):
    """None when the call succeeds, else its LLMException (not raised)."""
    try:
        call(*args, **kwargs)
    except LLMException as exc:
        return exc
    return None


def remote_code(peer, timeout=20):
    """The status code of the command a PeerProcess is running (None: success)."""
    try:
        peer.result(timeout=timeout)
    except PeerError as exc:
        return exc.status_code
    return OK


def name(code):
    """A status code (or None: success) as its name, for messages."""
    if code is None:
        return "success"
    try:
        return LLMStatusCode(code).name
    except ValueError:
        return str(code)


def still_there(cm, cache):
    try:
        return cm.get_cache(cache.cache_id) is cache
    except LLMException:
        return False


# --- report 1: unregister / deallocate while a read into the region runs ------------------


READ_BYTES = 256 * MiB
PIECE = 4096


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unregister_memory_during_a_read_into_it_waits_or_refuses_and_no_byte_lands_after(
        world, transport):
    # The peer's cache is read into our region R as 65,536 pieces of 4 KiB
    # (R in reverse order: no piece merges). While the read is in flight,
    # unregister_memory(R) must wait for it (up to timeout_ms) or refuse
    # with LLM_LINK_BUSY; once it has returned, nothing may write R.
    prompt = world.spawn("prompt", 1, transport=transport,
                         buf_pool_cfg=pool(READ_BYTES + 4 * MiB))
    src = prompt.call("alloc_blocks", 2, [READ_BYTES // 2 // 8192, 4096], key_cluster=1)
    prompt.call("fill", src, seed=1)
    with TransferEngine("reader", transport=transport, timeout_ms=3000) as engine:
        region_memory = np.zeros(READ_BYTES, dtype=np.uint8)
        region = engine.register_memory(region_memory.ctypes.data, region_memory.nbytes)
        peer = engine.connect(prompt.address)
        (_, remote_base, remote_length), = engine.call(peer, "engine.regions", {})["regions"]
        assert remote_length == READ_BYTES
        # One small read first: lanes / the shared mapping are set up.
        engine.transfer_sync(peer, "read", [region_memory.ctypes.data], [remote_base], [PIECE])
        offsets = np.arange(READ_BYTES // PIECE, dtype=np.uint64) * np.uint64(PIECE)
        # Over TCP the peer sends the data: frozen for the read's first
        # 0.5 s, it cannot end before we unregister. (Shared memory is
        # copied here, 256 MiB of first-touch pages: far longer than the
        # unregister takes.)
        freeze = world.freeze(prompt).stop().resume_after(0.5)
        request = engine.transfer_async(peer, "read", region_memory.ctypes.data + offsets[::-1],
                                        remote_base + offsets, np.full(offsets.size, PIECE))
        wait_until(lambda: peer.link.in_flight or request.status() != "pending", 5,
                   what="the read in flight")
        assert request.status() == "pending", "the read ended before it could be raced"
        refused = status_of(engine.unregister_memory, region)
        returned_frozen = freeze.resumed_at is None
        region_memory[:] = 0                  # after unregister returned: not ours to get
        code = status_of(request.wait, 15_000)
        landed = int(np.count_nonzero(region_memory))
        assert refused is None or refused.status_code == LLMStatusCode.LLM_LINK_BUSY, refused
        when = "while the peer was still frozen" if returned_frozen else "after it continued"
        assert landed == 0, (
            f"{landed} bytes of the read landed in the region after unregister_memory "
            f"{'refused' if refused else 'returned'} (it returned {when}; the read ended with "
            f"{name(code and code.status_code)})")
        if refused is not None:
            # Refused: still registered, usable, and unregistrable now.
            assert region in [r[0] for r in engine.regions()]
            engine.transfer_sync(peer, "read", [region_memory.ctypes.data], [remote_base],
                                 [PIECE])
            assert region_memory[:PIECE].any()
            engine.unregister_memory(region)


# 128 MiB pulled as 32,768 blocks of 4 KiB into a blocks cache (2 tensors).
PULL_BYTES = 128 * MiB
PULL_DESC = blocks_desc(2, PULL_BYTES // 2, 4096)
PULL_BLOCKS = PULL_DESC.shape[0]


def _pulling_decoder(world, transport, pool_bytes):
    """A prompt process holding a filled 128 MiB blocks cache (key of
    cluster 1), and a decoder here, linked to it."""
    prompt = world.spawn("prompt", 1, transport=transport,
                         buf_pool_cfg=pool(PULL_BYTES + 4 * MiB), sync_kv_timeout=5000)
    src = prompt.call("alloc_blocks", 2, PULL_DESC.shape, key_cluster=1)
    prompt.call("fill", src, seed=1)
    decoder = world.datadist("decoder", 2, transport, listen="", pool_bytes=pool_bytes,
                             sync_kv_timeout=5000)
    link(decoder, 1, prompt.address)
    return prompt, decoder


def _start_big_pull(world, prompt, decoder, transport, cache):
    """Start pulling every block into ``cache`` (destination blocks reversed:
    32,768 separate pieces) and return once it is in flight.

    Over TCP the prompt, which sends the data, is slowed down for the first
    second (it runs 0.5 ms in every 50): it still answers the free's notice
    to forget the cache within ~0.1 s, but sends only a few MiB by then; the
    rest lands after the test has refilled the memory. (Frozen instead, it
    would answer the notice only when continued, and then send all 128 MiB
    in ~60 ms, overlapping the refill.) Shared memory is copied by this
    process: 128 MiB in ~30 ms, against a notice's round trip of ~1 ms; the
    refill starts with the blocks the copy writes last (helpers.fill_cache)."""
    cm = decoder.cache_manager
    cm.pull_blocks(BlocksCacheKey(1), cache, [0], [0])        # look-up and lanes ready
    if transport == "tcp":
        world.throttle(prompt).release_after(1.0)
    blocks = list(range(PULL_BLOCKS))
    pull = Outcome(cm.pull_blocks, BlocksCacheKey(1), cache, blocks, blocks[::-1])
    link_state = decoder.engine.find_peer(1).link
    wait_until(lambda: link_state.in_flight or pull.done(), 5, what="the pull in flight")
    assert not pull.done(), f"the pull ended ({name(pull.code)}) before it could be raced"
    return pull


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deallocate_cache_during_a_pull_into_it_waits_or_refuses_and_the_next_cache_gets_no_byte_of_it(  # noqa: E501
        world, transport):
    # The pool must hold X and Y at once, should the free be refused.
    prompt, decoder = _pulling_decoder(world, transport, 2 * PULL_BYTES + 4 * MiB)
    cm = decoder.cache_manager
    x = cm.allocate_blocks_cache(PULL_DESC)
    pull = _start_big_pull(world, prompt, decoder, transport, x)
    refused = status_of(cm.deallocate_cache, x)
    pull_running = not pull.done()
    y = cm.allocate_blocks_cache(PULL_DESC)         # the pool's first fit: X's memory
    fill_cache(y, 0x5A)
    pull.join(20)
    changed = bytes_not_equal(y, 0x5A)
    assert refused is None or refused.status_code == LLMStatusCode.LLM_LINK_BUSY, refused
    assert changed == 0, (
        f"{changed} bytes of the pull landed in the next cache (at "
        f"{'the same' if y.tensor_addrs[0] == x.tensor_addrs[0] else 'another'} address) "
        f"after deallocate_cache {'refused' if refused else 'returned'} with the pull "
        f"{'still running' if pull_running else 'ended'}; the pull reported {name(pull.code)}")
    if refused is not None:
        assert still_there(cm, x), "a refused deallocate_cache dropped the cache"
        cm.deallocate_cache(x)                  # the pull has ended: now it frees
    cm.deallocate_cache(y)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unregister_cache_during_a_pull_into_it_waits_or_refuses_and_no_byte_lands_after(
        world, transport):
    # The same with memory the user owns (register_blocks_cache): once
    # unregister_cache returned, the user may reuse it.
    prompt, decoder = _pulling_decoder(world, transport, 8 * MiB)
    cm = decoder.cache_manager
    owned = [np.zeros(PULL_DESC.shape, dtype=np.float16) for _ in range(2)]
    x = cm.register_blocks_cache(PULL_DESC, [a.ctypes.data for a in owned])
    pull = _start_big_pull(world, prompt, decoder, transport, x)
    refused = status_of(cm.unregister_cache, x.cache_id)
    pull_running = not pull.done()
    for a in reversed(owned):                   # see helpers.fill_cache
        as_bytes(a)[:] = 0
    pull.join(20)
    landed = sum(int(np.count_nonzero(as_bytes(a))) for a in owned)
    assert refused is None or refused.status_code == LLMStatusCode.LLM_LINK_BUSY, refused
    assert landed == 0, (
        f"{landed} bytes of the pull landed in the user's memory after unregister_cache "
        f"{'refused' if refused else 'returned'} with the pull "
        f"{'still running' if pull_running else 'ended'}; the pull reported {name(pull.code)}")
    if refused is not None:
        assert still_there(cm, x), "a refused unregister_cache dropped the cache"
        cm.unregister_cache(x.cache_id)


# --- report 2: the owner frees a cache a peer is pushing into (shm) ------------------------


PUSH_BYTES = 128 * MiB
PUSH_DESC = blocks_desc(2, PUSH_BYTES // 2, 4096)
PUSH_BLOCKS = PUSH_DESC.shape[0]
PUSH_TIMEOUT_MS = 200


def _pushed_prompt(world, transport):
    """A prompt here (room for two push-sized caches) and a decoder process
    holding a filled 128 MiB blocks cache, linked to it; sync_kv_timeout
    200 ms on both sides."""
    prompt = world.datadist("prompt", 1, transport, pool_bytes=2 * PUSH_BYTES + 4 * MiB,
                            sync_kv_timeout=PUSH_TIMEOUT_MS, link_timeout=1000)
    decoder = world.spawn("decoder", 2, listen="", transport=transport,
                          buf_pool_cfg=pool(PUSH_BYTES + 4 * MiB),
                          sync_kv_timeout=PUSH_TIMEOUT_MS)
    src = decoder.call("alloc_blocks", 2, PUSH_DESC.shape)
    decoder.call("fill", src, seed=3)
    _relink(prompt, decoder)
    return prompt, decoder, src


def _relink(prompt, decoder):
    """(Re)link the decoder to the prompt: a control call that times out
    (the free's notice to a frozen decoder) fails the link."""
    if decoder.call("link_state", 1) != "LINKED":
        assert decoder.call("link", 1, prompt.listen_address) == LLMStatusCode.LLM_SUCCESS


def _push_and_catch(decoder, src, x, timeout_s=10):
    """Push every block of ``src`` into ``x`` (destination blocks reversed,
    so the first piece lands in X's tensor 0, last block, and the last
    piece in tensor 1, block 0); return once its first bytes are in X, with
    a function that says whether the push has written its last piece."""
    first, last = block_view(x, 0, PUSH_BLOCKS - 1), block_view(x, 1, 0)
    first[:] = 0
    last[:] = 0
    blocks = list(range(PUSH_BLOCKS))
    # On a loaded host the 200 ms deadline can pass before the first byte
    # moves; such a push never raced the free, so it is sent again.
    for _ in range(3):
        decoder.send("push_blocks", 1, src, blocks, blocks[::-1])
        wait_until(lambda: first.any() or decoder.conn.poll(), timeout_s,
                   what="the push's first bytes")
        if first.any():
            return lambda: bool(last.any())
        code = remote_code(decoder)
        if code != LLMStatusCode.LLM_TIMEOUT:
            break
    raise AssertionError(f"the push ended ({name(code)}) without writing")


def test_a_cache_freed_during_a_shm_push_gets_no_byte_after_the_free_and_the_late_push_times_out(  # noqa: E501
        world):
    # The decoder pushes 128 MiB into the prompt's cache X and is frozen
    # mid-copy (the shared-memory transport copies in the decoder). The
    # prompt frees X: that must wait for the push or refuse (LINK_BUSY).
    # The prompt's next cache Y (the pool's first fit: X's memory when X
    # was freed) is filled; the decoder continues, 0.5 s after it was
    # frozen, well past its 200 ms deadline. Y must not change, and the
    # push must fail with LLM_TIMEOUT.
    prompt, decoder, src = _pushed_prompt(world, "shm")
    cm = prompt.cache_manager
    x = cm.allocate_blocks_cache(PUSH_DESC, BlocksCacheKey(1))
    freeze = world.freeze(decoder)
    ended = _push_and_catch(decoder, src, x)
    freeze.stop()
    assert not ended(), "the push ended before the decoder could be frozen"
    refused = status_of(cm.deallocate_cache, x)
    y = cm.allocate_blocks_cache(PUSH_DESC)
    fill_cache(y, 0xA5)
    freeze.resume_after(0.5)
    code = remote_code(decoder)
    frozen_s = freeze.frozen_s
    changed = bytes_not_equal(y, 0xA5)
    assert refused is None or refused.status_code == LLMStatusCode.LLM_LINK_BUSY, refused
    problems = []
    if changed:
        problems.append(
            f"{changed} bytes of the push landed in the next cache (at "
            f"{'the same' if y.tensor_addrs[0] == x.tensor_addrs[0] else 'another'} address) "
            f"after deallocate_cache {'refused' if refused else 'returned'}")
    if code != LLMStatusCode.LLM_TIMEOUT:
        problems.append(f"the push, frozen {frozen_s:.2f} s against a {PUSH_TIMEOUT_MS} ms "
                        f"deadline, reported {name(code)}, not LLM_TIMEOUT")
    assert not problems, "; ".join(problems)
    if refused is not None:
        assert still_there(cm, x), "a refused deallocate_cache dropped the cache"
        cm.deallocate_cache(x)
    cm.deallocate_cache(y)


# How long the decoder is frozen once the push's first bytes landed (None:
# not at all), round after round.
LOOP_FREEZES = [None, 0.05, 0.15, 0.3]
LOOP_ROUNDS = 20


def test_caches_freed_during_shm_pushes_never_receive_bytes_afterwards(world):
    # Report 2 as a loop: each round the decoder pushes 128 MiB into the
    # prompt's X while the prompt frees X, allocates a keyless Y (X's memory
    # when X was freed), fills it and checks it after the push ended. The
    # decoder is frozen mid-push for a different time each round (or not at
    # all), so the free meets the copy at different points; a push frozen
    # past its 200 ms deadline must not report success.
    prompt, decoder, src = _pushed_prompt(world, "shm")
    cm = prompt.cache_manager
    freeze = world.freeze(decoder)
    overwritten, late_success, caught = [], [], 0
    for i in range(LOOP_ROUNDS):
        hold = LOOP_FREEZES[i % len(LOOP_FREEZES)]
        _relink(prompt, decoder)
        x = cm.allocate_blocks_cache(PUSH_DESC, BlocksCacheKey(1))
        ended = _push_and_catch(decoder, src, x)
        if hold is not None:
            freeze.stop()
            caught += not ended()
            freeze.resume_after(hold)
        refused = status_of(cm.deallocate_cache, x)
        assert refused is None or refused.status_code == LLMStatusCode.LLM_LINK_BUSY, refused
        y = cm.allocate_blocks_cache(PUSH_DESC)
        value = 1 + i % 250
        fill_cache(y, value)
        code = remote_code(decoder)
        freeze.resume()
        assert code in (OK, LLMStatusCode.LLM_TIMEOUT, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                        LLMStatusCode.LLM_LINK_FAILED), f"round {i}: {name(code)}"
        changed = bytes_not_equal(y, value)
        if changed:
            overwritten.append((i, hold, changed))
        if hold is not None and hold > PUSH_TIMEOUT_MS / 1000 and code == OK:
            late_success.append((i, hold))
        if refused is not None:
            assert still_there(cm, x), f"round {i}: a refused deallocate_cache dropped the cache"
            cm.deallocate_cache(x)
        cm.deallocate_cache(y)
    frozen_rounds = sum(LOOP_FREEZES[i % len(LOOP_FREEZES)] is not None
                        for i in range(LOOP_ROUNDS))
    assert caught >= frozen_rounds // 2, \
        f"only {caught} of {frozen_rounds} pushes were frozen in flight: the race was not run"
    assert not overwritten and not late_success, (
        f"the next cache received bytes of the push in rounds (round, freeze s, bytes) "
        f"{overwritten}; pushes frozen past their deadline reported success in rounds "
        f"{late_success} (of {LOOP_ROUNDS})")


# --- report 3: a refused free must leave the cache, and let a retry free it -----------------


# Larger than what the kernel's socket buffers take in (here up to 32 MiB
# received + 4 MiB sent): over TCP the prompt cannot finish sending early.
READER_BYTES = 128 * MiB
READER_DESC = blocks_desc(2, READER_BYTES // 2, 4096)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_free_refused_while_a_peer_reads_slowly_keeps_the_cache_and_a_retry_frees_it(
        world, transport):
    # A peer reads the prompt's 128 MiB cache X slowly: it is alive (answers
    # control calls within 50 ms) but runs 0.5 ms in every 50. The prompt's
    # deallocate_cache(X) must refuse with LLM_LINK_BUSY at its deadline
    # (sync_kv_timeout 1 s), leaving X allocated, registered and intact.
    # Once the read has ended a retry frees X, and the pool (room for one X)
    # gives the space out again.
    owner = world.datadist("prompt", 1, transport, pool_bytes=READER_BYTES + 4 * MiB,
                           sync_kv_timeout=1000, link_timeout=1000)
    cm = owner.cache_manager
    x = cm.allocate_blocks_cache(READER_DESC, BlocksCacheKey(1))
    fill_cache(x, 0x3C)
    reader = world.raw_reader(transport, owner.listen_address, READER_BYTES, timeout_ms=30_000)
    # 32,768 pieces of 4 KiB, landing in reverse order: the first at the
    # end of the reader's buffer, the last at its start.
    offsets = np.arange(READER_BYTES // PIECE, dtype=np.uint64) * np.uint64(PIECE)
    remote = np.concatenate([np.uint64(a) + offsets[:offsets.size // 2] for a in x.tensor_addrs])
    first, last = reader.buffer[-PIECE:], reader.buffer[:PIECE]
    reader.read(remote, offsets[::-1], np.full(offsets.size, PIECE))
    wait_until(lambda: first.any() or reader.conn.poll(), 10, what="the read's first bytes")
    throttle = world.throttle(reader)
    assert not last.any(), "the read ended before it could be slowed down"
    started = time.monotonic()
    refused = status_of(cm.deallocate_cache, x)
    took = time.monotonic() - started
    reading = not last.any()
    exists = still_there(cm, x)
    registered = x.region_ids[0] in [r[0] for r in owner.engine.regions()]
    throttle.release()
    read_code = reader.result(20)
    assert reading, "the read ended before deallocate_cache returned: nothing was tested"
    problems = []
    if refused is None:
        problems.append(f"deallocate_cache returned success after {took:.2f} s while a peer "
                        f"was still reading the cache")
    elif refused.status_code != LLMStatusCode.LLM_LINK_BUSY:
        problems.append(f"deallocate_cache refused with {refused}, not LLM_LINK_BUSY")
    else:
        if not (exists and registered):
            problems.append(f"after LLM_LINK_BUSY (in {took:.2f} s) the cache is "
                            f"{'still' if exists else 'no longer'} allocated and its region "
                            f"{'still' if registered else 'no longer'} registered")
        if bytes_not_equal(x, 0x3C):
            problems.append("the refused free changed the cache")
        if read_code != OK or np.count_nonzero(reader.buffer != 0x3C):
            problems.append(f"the read of the kept cache ended with {name(read_code)}, "
                            f"{np.count_nonzero(reader.buffer != 0x3C)} bytes wrong")
        retry = status_of(cm.deallocate_cache, x)
        if retry is not None:
            problems.append(f"a retry after the read ended failed: {retry}")
    again = status_of(cm.allocate_blocks_cache, READER_DESC)
    if again is not None:
        problems.append(f"the cache's pool space is not given out again: {again}")
    assert not problems, "; ".join(problems)


# --- report 4: a peer's remembered lookup of a key that was removed or moved ----------------


KEY = CacheKey(prompt_cluster_id=1, req_id=5)
ROW_DESC = CacheDesc(2, DataType.DT_FLOAT16, [1, 2048])


def _keyed_prompt(world, transport):
    prompt = world.datadist("prompt", 1, transport, pool_bytes=16 * MiB)
    cm = prompt.cache_manager
    a = cm.allocate_cache(ROW_DESC, [KEY])
    _fill_pattern(a, seed=1)
    decoder = world.spawn("decoder", 2, listen="", transport=transport, buf_pool_cfg=pool(16 * MiB))
    dst = decoder.call("alloc_cache", 2, ROW_DESC.shape)
    assert decoder.call("link", 1, prompt.listen_address) == LLMStatusCode.LLM_SUCCESS
    assert _holds(_read_by_key(decoder, dst), a)          # the decoder remembers the look-up
    return prompt, cm, a, decoder, dst


def _fill_pattern(cache, seed):
    for i, tensor in enumerate(cache.tensors()):
        as_bytes(tensor)[:] = pattern(seed, i, tensor.nbytes)


def _read_by_key(decoder, dst):
    decoder.call("pull_cache", 1, None, dst, req_id=KEY.req_id)
    return [t.reshape(-1) for t in decoder.call("tensors", dst)]


def _holds(got, cache):
    return all(np.array_equal(g, as_bytes(t)) for g, t in zip(got, cache.tensors()))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_pull_by_a_removed_cache_key_says_not_exist(world, transport):
    prompt, cm, a, decoder, dst = _keyed_prompt(world, transport)
    cm.remove_cache_key(KEY)
    with pytest.raises(PeerError) as err:
        got = _read_by_key(decoder, dst)
        raise AssertionError(f"the pull by the removed key succeeded, reading "
                             f"{'the old cache' if _holds(got, a) else 'other bytes'}")
    assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, name(
        err.value.status_code)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_pull_by_a_cache_key_given_to_a_new_cache_reads_the_new_cache(world, transport):
    prompt, cm, a, decoder, dst = _keyed_prompt(world, transport)
    cm.remove_cache_key(KEY)
    b = cm.allocate_cache(ROW_DESC, [KEY])
    _fill_pattern(b, seed=2)
    got = _read_by_key(decoder, dst)
    assert _holds(got, b), (
        f"the pull by the key read {'the old cache' if _holds(got, a) else 'other bytes'}, "
        f"not the cache the key now names")
