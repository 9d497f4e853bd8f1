"""kvcache.compat.mooncake in the shape of Mooncake's own wheel tests
(transfer_engine_initiator_test.py / transfer_engine_target.py): the target
is a process of its own, the initiator writes random strings, reads them
back and compares, one by one, in batches and in asynchronous batches; then
every failure is a negative code, never an exception. Each runs on tcp and
shm here and on rdma in the VM lane."""
import json
import os
import random
import string

import numpy as np
import pytest

from conftest import require_rdma
from mooncake_target import Target
from kvcache.compat import mooncake
from kvcache.compat.mooncake import TransferEngine, TransferNotify, TransferOpcode
from kvcache.compat.mooncake_config import MooncakeConfig, load_config
from kvcache.status import LLMException

TRANSPORTS = ["tcp", "shm", pytest.param("rdma", marks=pytest.mark.rdma)]
CIRCLES = 200
BATCH, SLOT = 100, 1024


# One target and one initiator per protocol for the module (starting processes is what
# costs time in the VM lane); a test that kills its target starts its own.
@pytest.fixture(scope="module", params=TRANSPORTS)
def protocol(request):
    if request.param == "rdma":
        require_rdma()
    return request.param


@pytest.fixture(scope="module")
def host(protocol):
    return os.environ.get("PYVERBS_KV_TEST_IP", "10.99.0.1") if protocol == "rdma" \
        else "127.0.0.1"


@pytest.fixture(scope="module")
def target(protocol, host):
    peer = Target(protocol, host=host)
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def initiator(protocol, host):
    engine = TransferEngine(managed_pool_bytes=4 << 20)
    assert engine.initialize(host, "P2PHANDSHAKE", protocol, "") == 0
    yield engine
    engine.close()


def random_bytes(rng, low, high):
    chars = string.ascii_letters + string.digits + string.punctuation
    return "".join(rng.choices(chars, k=rng.randint(low, high))).encode()


def test_segment_name_is_host_and_rpc_port(initiator, host):
    assert initiator.get_local_segment_name() == f"{host}:{initiator.get_rpc_port()}"
    assert initiator.get_rpc_port() > 0


def test_random_write_then_read_back(initiator, target):
    rng = random.Random(1)
    me = initiator.get_local_segment_name()
    src = initiator.get_first_buffer_address(me)
    dst = initiator.get_first_buffer_address(target.segment)
    assert dst == target.first and src != 0
    for i in range(CIRCLES):
        data = random_bytes(rng, 16, 256)
        assert initiator.write_bytes_to_buffer(src, data, len(data)) == 0
        assert initiator.transfer_sync_write(target.segment, src, dst, len(data)) == 0, i
        assert initiator.write_bytes_to_buffer(src, bytes(len(data)), len(data)) == 0
        assert initiator.transfer_sync_read(target.segment, src, dst, len(data)) == 0, i
        assert initiator.read_bytes_from_buffer(src, len(data)) == data, i
    # The last string is in the target's memory, as the target itself reads it.
    assert target.read(dst, len(data)) == data


@pytest.mark.parametrize("asynchronous", [False, True])
def test_batch_write_then_read_back(initiator, target, asynchronous):
    rng = random.Random(2)
    src0 = initiator.get_first_buffer_address(initiator.get_local_segment_name())
    dst0 = initiator.get_first_buffer_address(target.segment)
    srcs = [src0 + i * SLOT for i in range(BATCH)]
    dsts = [dst0 + i * SLOT for i in range(BATCH)]

    def run(op, *args):
        if not asynchronous:
            return getattr(initiator, f"batch_transfer_sync_{op}")(target.segment, *args)
        batch_id = getattr(initiator, f"batch_transfer_async_{op}")(target.segment, *args)
        assert batch_id != 0
        return initiator.get_batch_transfer_status([batch_id])

    for _ in range(3):
        data = [random_bytes(rng, 32, 128) for _ in range(BATCH)]
        lengths = [len(d) for d in data]
        for s, d in zip(srcs, data):
            assert initiator.write_bytes_to_buffer(s, d, len(d)) == 0
        assert run("write", srcs, dsts, lengths) == 0
        for s, n in zip(srcs, lengths):
            assert initiator.write_bytes_to_buffer(s, bytes(n), n) == 0
        assert run("read", srcs, dsts, lengths) == 0
        assert [initiator.read_bytes_from_buffer(s, n) for s, n in zip(srcs, lengths)] == data
    assert target.read(dsts[-1], lengths[-1]) == data[-1]


def test_several_async_batches_and_check_status(initiator, target):
    src = initiator.allocate_managed_buffer(64 * SLOT)
    dst = target.first
    payload = np.random.default_rng(3).integers(0, 256, 64 * SLOT, dtype=np.uint8).tobytes()
    assert initiator.write_bytes_to_buffer(src, payload, len(payload)) == 0
    ids = [initiator.batch_transfer_async_write(target.segment, [src + i * SLOT],
                                                [dst + i * SLOT], [SLOT]) for i in range(64)]
    assert 0 not in ids and len(set(ids)) == 64
    assert initiator.get_batch_transfer_status(ids) == 0
    assert target.read(dst, len(payload)) == payload
    # A collected batch is forgotten.
    assert initiator.get_batch_transfer_status(ids[:1]) == mooncake.ERR_INVALID_ARGUMENT
    one = initiator.transfer_submit_write(target.segment, src, dst, SLOT)
    assert one > 0
    state = initiator.transfer_check_status(one)
    while state == 0:                       # the transfer has a deadline: this ends
        state = initiator.transfer_check_status(one)
    assert state == 1
    assert initiator.transfer_check_status(one) == -1        # reported, then forgotten
    assert initiator.free_managed_buffer(src, 64 * SLOT) == 0


def test_registered_user_memory(initiator, target):
    local = np.arange(4096, dtype=np.uint8)
    reply = target.ask(cmd="register", len=4096)
    assert reply["code"] == 0
    assert initiator.register_memory(local.ctypes.data, local.nbytes) == 0
    assert initiator.register_memory(local.ctypes.data + 8, 16) == mooncake.ERR_ADDRESS_OVERLAPPED
    assert initiator.transfer_sync_write(target.segment, local.ctypes.data, reply["addr"],
                                         4096) == 0
    assert target.read(reply["addr"], 4096) == local.tobytes()
    # The target withdraws its memory: a transfer into it is refused.
    assert target.ask(cmd="unregister", addr=reply["addr"])["code"] == 0
    assert initiator.transfer_sync_write(target.segment, local.ctypes.data, reply["addr"],
                                         16) == mooncake.ERR_ADDRESS_NOT_REGISTERED
    assert initiator.unregister_memory(local.ctypes.data) == 0
    assert initiator.transfer_sync_write(target.segment, local.ctypes.data, target.first,
                                         16) == mooncake.ERR_ADDRESS_NOT_REGISTERED
    more = [np.zeros(1024, dtype=np.uint8) for _ in range(3)]
    addrs = [a.ctypes.data for a in more]
    assert initiator.batch_register_memory(addrs, [1024] * 3) == 0
    assert initiator.batch_unregister_memory(addrs) == 0
    assert initiator.batch_unregister_memory(addrs) == mooncake.ERR_ADDRESS_NOT_REGISTERED


def test_notification_follows_the_transfer(initiator, target):
    src = initiator.get_first_buffer_address(initiator.get_local_segment_name())
    assert initiator.write_bytes_to_buffer(src, b"layer-7", 7) == 0
    assert initiator.transfer_sync(target.segment, src, target.first, 7, TransferOpcode.WRITE,
                                   TransferNotify("req-1", "kv ready")) == 0
    assert initiator.batch_transfer_sync(target.segment, [src], [target.first + 64], [7],
                                         TransferOpcode.WRITE, TransferNotify("req-2", "")) == 0
    assert target.ask(cmd="notifies")["notifies"] == [["req-1", "kv ready"], ["req-2", ""]]
    assert target.read(target.first, 7) == b"layer-7"


def test_failures_are_negative_codes(initiator, target, caplog):
    caplog.set_level("WARNING", logger="kvcache.compat.mooncake")
    src = initiator.get_first_buffer_address(initiator.get_local_segment_name())
    seg, dst = target.segment, target.first
    codes = {
        "remote outside": initiator.transfer_sync_write(seg, src, dst + (64 << 20), 8),
        "local outside": initiator.transfer_sync_read(seg, 4096, dst, 8),
        "zero length": initiator.transfer_sync_write(seg, src, dst, 0),
        "not a segment": initiator.transfer_sync_write("no-port", src, dst, 8),
        "nobody there": initiator.transfer_sync_write("127.0.0.1:1", src, dst, 8),
        "bad type": initiator.transfer_sync_write(seg, "src", dst, 8),
        "unequal batch": initiator.batch_transfer_sync_write(seg, [src, src], [dst], [8]),
        "bad opcode": initiator.transfer_sync(seg, src, dst, 8, 7),
        "write outside": initiator.write_bytes_to_buffer(8, b"abc", 3),
        "unregister unknown": initiator.unregister_memory(12345),
        "register unmapped": initiator.register_memory(4096, 4096),
        "free unknown": initiator.free_managed_buffer(src + 12, 8),
    }
    assert codes == {
        "remote outside": mooncake.ERR_ADDRESS_NOT_REGISTERED,
        "local outside": mooncake.ERR_ADDRESS_NOT_REGISTERED,
        "zero length": mooncake.ERR_INVALID_ARGUMENT,
        "not a segment": mooncake.ERR_DNS_FAIL,
        "nobody there": mooncake.ERR_SOCKET_FAIL,
        "bad type": mooncake.ERR_INVALID_ARGUMENT,
        "unequal batch": mooncake.ERR_INVALID_ARGUMENT,
        "bad opcode": mooncake.ERR_INVALID_ARGUMENT,
        "write outside": mooncake.ERR_ADDRESS_NOT_REGISTERED,
        "unregister unknown": mooncake.ERR_ADDRESS_NOT_REGISTERED,
        "register unmapped": mooncake.ERR_INVALID_ARGUMENT,
        "free unknown": mooncake.ERR_ADDRESS_NOT_REGISTERED,
    }
    assert initiator.read_bytes_from_buffer(8, 3) == b""
    assert initiator.batch_transfer_async_write(seg, [4096], [dst], [8]) == 0
    assert initiator.allocate_managed_buffer(1 << 40) == 0
    assert initiator.get_first_buffer_address("127.0.0.1:1") == 0
    # Each failure logged the LLMException behind it.
    assert "LLM_PARAM_INVALID" in caplog.text and "LLM_LINK_FAILED" in caplog.text
    # The link survived all of it.
    assert initiator.transfer_sync_write(seg, src, dst, 8) == 0


def test_a_killed_target_fails_the_transfer(initiator, protocol, host):
    target = Target(protocol, host=host)
    try:
        src = initiator.get_first_buffer_address(initiator.get_local_segment_name())
        assert initiator.transfer_sync_write(target.segment, src, target.first, 64) == 0
        target.kill()
        assert initiator.transfer_sync_write(target.segment, src, target.first, 64) < 0
        assert initiator.send_probe(target.segment) < 0
    finally:
        target.close()


def test_calls_before_initialize_and_after_close():
    engine = TransferEngine()
    assert engine.get_rpc_port() == mooncake.ERR_CONTEXT
    assert engine.transfer_sync_write("127.0.0.1:1", 1, 1, 1) == mooncake.ERR_CONTEXT
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "carrier-pigeon", "") == \
        mooncake.ERR_DEVICE_NOT_FOUND
    assert engine.initialize("127.0.0.1", "zookeeper://x:1", "tcp", "") == \
        mooncake.ERR_INVALID_ARGUMENT
    assert engine.initialize("127.0.0.1", "", "tcp", "") == 0
    assert engine.initialize("127.0.0.1", "", "tcp", "") == mooncake.ERR_INVALID_ARGUMENT
    engine.close()
    engine.close()
    assert engine.allocate_managed_buffer(64) == 0


def test_mooncake_json(tmp_path, monkeypatch):
    path = tmp_path / "mooncake.json"
    path.write_text(json.dumps({"prefill_url": "127.0.0.1:13003", "decode_url": "127.0.0.1:14003",
                                "metadata_server": "etcd://127.0.0.1:2379", "protocol": "rdma",
                                "device_name": "rxe0", "metadata_backend": "etcd"}))
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(path))
    assert load_config() == MooncakeConfig("127.0.0.1:13003", "127.0.0.1:14003",
                                           "etcd://127.0.0.1:2379", "rdma", "rxe0")
    path.write_text(json.dumps({"prefill_url": "a:1", "decode_url": "b:2"}))
    assert load_config(str(path)) == MooncakeConfig("a:1", "b:2", "P2PHANDSHAKE", "tcp", "")
    for bad in ("[1, 2]", "{", json.dumps({"prefill_url": "a:1"}),
                json.dumps({"prefill_url": "a:1", "decode_url": 5})):
        path.write_text(bad)
        with pytest.raises(LLMException, match="mooncake.json"):
            load_config()
    monkeypatch.delenv("MOONCAKE_CONFIG_PATH")
    with pytest.raises(LLMException, match="MOONCAKE_CONFIG_PATH"):
        load_config()
