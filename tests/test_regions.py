"""The region registry, the shared-memory pin board and asynchronous requests, in one process."""
import threading
import time

import numpy as np
import pytest

from kvcache import LLMException, LLMStatusCode
from kvcache.engine.regions import RegionRegistry
from kvcache.transports.base import SLOTS
from kvcache.transports.base import Transport
from pyverbs_kv import pieces


class Recorder(Transport):
    name = "recorder"

    def __init__(self):
        self.calls = []

    def register_region(self, region_id, addr, length, share=None):
        self.calls.append(("register", region_id))

    def unregister_region(self, region_id):
        self.calls.append(("unregister", region_id))

    def publish_region(self, region_id):
        self.calls.append(("publish", region_id))

    def withdraw_region(self, region_id, deadline):
        self.calls.append(("withdraw", region_id))
        return True

    write = read = None


@pytest.fixture
def registry():
    memory = np.zeros(1 << 16, dtype=np.uint8)
    transport = Recorder()
    yield RegionRegistry(transport), memory, transport


def test_a_pinned_region_is_released_only_after_its_pins_end(registry):
    reg, memory, transport = registry
    rid = reg.register(memory.ctypes.data, memory.nbytes)
    _, pinned = reg.pin_local(np.array([memory.ctypes.data], np.uint64), np.array([8], np.uint64))
    threading.Timer(0.2, reg.unpin, args=(pinned,)).start()
    started = time.monotonic()
    reg.release(rid, time.monotonic() + 5)
    assert 0.15 < time.monotonic() - started < 2
    assert rid not in reg and ("unregister", rid) in transport.calls


def test_a_release_at_its_deadline_refuses_and_restores_the_region(registry):
    reg, memory, transport = registry
    top = reg.register(memory.ctypes.data, memory.nbytes, addressable=False)
    sub = reg.register(memory.ctypes.data + 4096, 4096, parent=top)
    addrs, lengths = np.array([memory.ctypes.data + 4096], np.uint64), np.array([8], np.uint64)
    ids = reg.pin_named(np.array([sub], np.uint64), addrs, lengths)
    with pytest.raises(LLMException) as err:
        reg.release(top, time.monotonic() + 0.1)
    assert err.value.status_code == LLMStatusCode.LLM_LINK_BUSY
    assert top in reg and sub in reg and reg.rows() == [(sub, memory.ctypes.data + 4096, 4096)]
    assert ("unregister", top) not in transport.calls
    assert transport.calls[-1] == ("publish", sub)          # reachable again
    reg.unpin(ids)
    reg.release(top, time.monotonic() + 1)
    assert reg.rows() == [] and ("unregister", top) in transport.calls


def test_pieces_naming_a_released_or_renewed_region_are_refused(registry):
    reg, memory, _ = registry
    top = reg.register(memory.ctypes.data, memory.nbytes, addressable=False)
    a = reg.register(memory.ctypes.data, 4096, parent=top)
    addrs, lengths = np.array([memory.ctypes.data], np.uint64), np.array([8], np.uint64)
    b = reg.renew(a)
    assert b != a
    with pytest.raises(LLMException) as err:
        reg.pin_named(np.array([a], np.uint64), addrs, lengths)
    assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    reg.unpin(reg.pin_named(np.array([b], np.uint64), addrs, lengths))
    with pytest.raises(LLMException) as err:       # an id never given: a foreign address
        reg.pin_named(np.array([b + 100], np.uint64), addrs, lengths)
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID


def test_live_regions_never_share_a_pin_board_slot(registry):
    reg, memory, _ = registry
    top = reg.register(memory.ctypes.data, memory.nbytes, addressable=False)
    first = reg.register(memory.ctypes.data, 16, parent=top)
    # Register and release until the id counter wraps around the board.
    for _ in range(SLOTS + 2):
        rid = reg.register(memory.ctypes.data + 16, 16, parent=top)
        assert rid % SLOTS != first % SLOTS
        reg.release(rid, time.monotonic() + 1)


def test_the_pin_board_never_lets_a_copy_in_after_a_withdrawal_it_missed():
    # A copier enters and checks; the owner withdraws and waits for copies in
    # flight. Whatever the interleaving, a copy never runs after the owner saw
    # no copy in flight.
    board = np.zeros(2 * SLOTS, dtype=np.uint64)
    addr = board.ctypes.data
    slot, rid = np.array([5], np.uint64), np.array([5], np.uint64)
    violations, stop = [], threading.Event()
    state = {"withdrawn": False}

    def copier():
        while not stop.is_set():
            if pieces.board_enter(addr, slot, rid) < 0:
                if state["withdrawn"]:
                    violations.append("copied after the owner released")
                pieces.board_leave(addr, slot)

    thread = threading.Thread(target=copier)
    thread.start()
    try:
        for _ in range(2000):
            pieces.board_publish(addr, 5, 5)
            state["withdrawn"] = False
            pieces.board_publish(addr, 5, 0)
            while pieces.board_in_flight(addr, 5):
                pass
            state["withdrawn"] = True            # the memory is "freed" now
            time.sleep(0)
    finally:
        stop.set()
        thread.join()
    assert not violations


def test_an_async_transfer_cancelled_by_close_fails_with_a_status():
    from concurrent.futures import Future

    from kvcache.engine.requests import TransferRequest
    future = Future()
    future.cancel()
    request = TransferRequest(future)
    assert request.status() == "failed"
    with pytest.raises(LLMException) as err:
        request.wait(100)
    assert err.value.status_code == LLMStatusCode.LLM_ENGINE_FINALIZED
