"""Device memory registered with the engine itself (kvcache.TransferEngine's
register_memory(..., device=...)) and through the Mooncake and FastDeploy
entry points, against the runtime test doubles loaded through
KVCACHE_CUDA_LIB / KVCACHE_ACL_LIB as a real process loads the runtime.
Each case runs in a fresh interpreter (a runtime library is loaded once per
process) or in a target process of its own; bytes are checked by reading
device memory back through the runtime."""
import os

import numpy as np
import pytest

from accel_doubles import RUNTIMES, run_python
from mooncake_target import Target

EVERY_WAY = """
import numpy as np
from kvcache import LLMException, LLMStatusCode, TransferEngine
from kvcache.device.runtime import D2H, H2D, DeviceRuntime

kind, transport, N = {kind!r}, {transport!r}, 10_000
rt = DeviceRuntime(kind, 0)
a = TransferEngine("a", transport=transport, device_chunk_size=1000)
b = TransferEngine("b", transport=transport, device_chunk_size=1000)
dev = {{"a": rt.alloc(N), "b": rt.alloc(N)}}
host = {{"a": np.zeros(N, np.uint8), "b": np.zeros(N, np.uint8)}}
for name, engine in (("a", a), ("b", b)):
    engine.register_memory(dev[name].ptr, N, device=f"{{kind}}:0")
    engine.register_memory(host[name].ctypes.data, N)
peer = a.connect(b.address, timeout_ms=10_000)

def addr(side, where):
    return dev[side].ptr if where == "device" else host[side].ctypes.data

def put(side, where, data):
    if where == "device":
        rt.copy(dev[side].ptr, data.ctypes.data, N, H2D)
    else:
        host[side][:] = data

def get(side, where):
    if where == "device":
        out = np.zeros(N, np.uint8)
        rt.copy(out.ctypes.data, dev[side].ptr, N, D2H)
        return out
    return host[side].copy()

rng = np.random.default_rng(7)
# Pieces of 3333 and 6667 bytes: neither divides the 1000-byte slots.
cuts = [0, 3333, N]
for here in ("host", "device"):
    for there in ("host", "device"):
        for op in ("write", "read"):
            data = rng.integers(0, 256, N, dtype=np.uint8)
            src, dst = (("a", here), ("b", there)) if op == "write" else (("b", there), ("a", here))
            put(*src, data)
            put(*dst, np.zeros(N, np.uint8))
            a.transfer_sync(peer, op, [addr("a", here) + c for c in cuts[:-1]],
                            [addr("b", there) + c for c in cuts[:-1]],
                            [cuts[i + 1] - cuts[i] for i in range(len(cuts) - 1)])
            assert (get(*dst) == data).all(), (here, there, op)
            path = "host" if here == there == "host" else "staged"
            assert a.transfer_path(peer) == path, (here, there, a.transfer_path(peer))
            print("moved", here, there, op)

# One batch, every kind of piece: host->device and device->host at once.
data = rng.integers(0, 256, N, dtype=np.uint8)
put("a", "host", data)
put("a", "device", data[::-1].copy())
a.transfer_sync(peer, "write", [host["a"].ctypes.data, dev["a"].ptr],
                [dev["b"].ptr, host["b"].ctypes.data], [4000, 6000])
assert (get("b", "device")[:4000] == data[:4000]).all()
assert (get("b", "host")[:6000] == data[::-1][:6000]).all()
print("mixed batch")

def refused(code, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except LLMException as exc:
        assert exc.status_code == code, exc
        return str(exc)
    raise AssertionError(f"{{call.__name__}}{{args}} was not refused")

# Device memory b withdrew: refused, nothing lands; registered again: found again.
(region,) = [r for r, at, _ in b.device_regions() if at == dev["b"].ptr]
b.unregister_memory(region)
put("b", "device", np.zeros(N, np.uint8))
refused(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, a.transfer_sync, peer, "write",
        [dev["a"].ptr], [dev["b"].ptr], [N])
assert not get("b", "device").any()
region = b.register_memory(dev["b"].ptr, N, device=kind)
a.transfer_sync(peer, "write", [dev["a"].ptr], [dev["b"].ptr], [N])
assert (get("b", "device") == get("a", "device")).all()
print("re-registered")

# Device memory not offered to peers is out of their reach.
hidden = rt.alloc(N)
b.register_memory(hidden.ptr, N, device=kind, remote_accessible=False)
refused(LLMStatusCode.LLM_PARAM_INVALID, a.transfer_sync, peer, "write",
        [dev["a"].ptr], [hidden.ptr], [N])
# A piece running past the end of a device region.
refused(LLMStatusCode.LLM_PARAM_INVALID, a.transfer_sync, peer, "write",
        [dev["a"].ptr], [dev["b"].ptr + 1], [N])
for bad in ("gpu", "cuda:x", "npu:-1"):
    refused(LLMStatusCode.LLM_PARAM_INVALID, a.register_memory, dev["a"].ptr, N, device=bad)
refused(LLMStatusCode.LLM_PARAM_INVALID, a.register_memory, dev["a"].ptr + 10, 100,
        device=kind)                                    # overlaps a's device region
refused(LLMStatusCode.LLM_PARAM_INVALID, a.register_memory, dev["a"].ptr, N, device=kind,
        parent=1)
other = "npu" if kind == "cuda" else "cuda"
refused(LLMStatusCode.LLM_PARAM_INVALID, a.register_memory, hidden.ptr, N, device=other)
refused(LLMStatusCode.LLM_PARAM_INVALID, b.unregister_memory, 1 << 50)
if kind == "cuda":
    refused(LLMStatusCode.LLM_PARAM_INVALID, a.register_memory, host["a"].ctypes.data, N,
            device="cuda")
# The link and both engines are still healthy.
a.transfer_sync(peer, "read", [dev["a"].ptr], [dev["b"].ptr], [N])
a.close()
b.close()
print("ok")
"""


@pytest.mark.parametrize("kind", ["cuda", "npu"])
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_engine_device_memory_moves_every_way_and_bad_input_is_refused(kind, transport,
                                                                        libraries):
    env = {var: libraries[k] for k, (_, _, var) in RUNTIMES.items()}
    res = run_python(EVERY_WAY.format(kind=kind, transport=transport), env, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("moved") == 8 and res.stdout.rstrip().endswith("ok"), res.stdout


@pytest.mark.parametrize("protocol", ["tcp", "shm"])
def test_mooncake_register_memory_finds_cuda_memory_and_stages_it(protocol, libraries):
    from kvcache.compat.mooncake import TransferEngine
    n = 6000
    # The double's device memory is host memory too: KVCACHE_DEVICE_TYPE=cuda
    # makes the target ask the runtime first (a real GPU's is never host memory).
    target = Target(protocol, env={"KVCACHE_CUDA_LIB": libraries["cuda"],
                                   "KVCACHE_DEVICE_TYPE": "cuda",
                                   "KVCACHE_DEVICE_CHUNK_BYTES": "1024"})
    engine = TransferEngine()
    try:
        assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", protocol, "") == 0
        reply = target.ask(cmd="register_device", len=n)
        assert reply["code"] == 0 and reply["device_regions"] == 1
        device = reply["addr"]
        local = np.random.default_rng(3).integers(0, 256, 2 * n, dtype=np.uint8)
        assert engine.register_memory(local.ctypes.data, local.nbytes) == 0
        assert engine.transfer_sync_write(target.segment, local.ctypes.data, device, n) == 0
        assert bytes.fromhex(target.ask(cmd="read_device", addr=device, len=n)["hex"]) \
            == local[:n].tobytes()
        fresh = os.urandom(n)
        target.ask(cmd="fill_device", addr=device, hex=fresh.hex())
        assert engine.transfer_sync_read(target.segment, local.ctypes.data + n, device, n) == 0
        assert local[n:].tobytes() == fresh
        # One batch: a device piece and a piece of the target's managed host pool.
        assert engine.batch_transfer_sync_write(
            target.segment, [local.ctypes.data, local.ctypes.data + 100],
            [device + 10, target.first], [100, 200]) == 0
        assert target.read(target.first, 200) == local[100:300].tobytes()
        assert bytes.fromhex(target.ask(cmd="read_device", addr=device + 10, len=100)["hex"]) \
            == local[:100].tobytes()
        # The CPU never touches device memory: Mooncake's byte helpers refuse it.
        assert target.ask(cmd="write_bytes", addr=device, hex="ab" * 8)["code"] == -3
        # Past the end of the device memory: refused, the link unharmed.
        assert engine.transfer_sync_write(target.segment, local.ctypes.data, device + 1, n) < 0
        assert engine.transfer_sync_write(target.segment, local.ctypes.data, device, n) == 0
    finally:
        engine.close()
        target.close()


FASTDEPLOY = """
import numpy as np
from kvcache.compat.fastdeploy import RDMACommunicator
from kvcache.device.runtime import D2H, H2D, DeviceRuntime

rt = DeviceRuntime("cuda", 0)
blocks, block = 8, 512
layer = blocks * block
tensors = {{role: [rt.alloc(layer) for _ in range(2)] for role in ("prefill", "decode")}}
decode = RDMACommunicator("decode", 0, 0, [tensors["decode"][0].ptr], [tensors["decode"][1].ptr],
                          blocks, block, transport={transport!r}, host="127.0.0.1")
prefill = RDMACommunicator("prefill", 0, decode.port, [tensors["prefill"][0].ptr],
                           [tensors["prefill"][1].ptr], blocks, block, transport={transport!r})
data = [np.random.default_rng(i).integers(0, 256, layer, dtype=np.uint8) for i in range(2)]
for t, d in zip(tensors["prefill"], data):
    rt.copy(t.ptr, d.ctypes.data, layer, H2D)
assert prefill.connect("127.0.0.1", decode.port) == 0
assert prefill.write_cache("127.0.0.1", decode.port, [1, 2, 5], [7, 0, 3], 0) == 0
for t, d in zip(tensors["decode"], data):
    out = np.zeros(layer, np.uint8)
    rt.copy(out.ctypes.data, t.ptr, layer, D2H)
    for src, dst in ((1, 7), (2, 0), (5, 3)):
        assert (out[dst * block:(dst + 1) * block] == d[src * block:(src + 1) * block]).all()
# Found as device memory on both sides: the blocks took the staged path.
assert len(decode._engine.device_regions()) == 2
(link,) = prefill._links.values()
assert prefill._engine.transfer_path(link.peer) == "staged"
prefill.close()
decode.close()
print("ok")
"""


def test_fastdeploy_caches_in_cuda_memory_are_found_and_written(libraries):
    env = {"KVCACHE_CUDA_LIB": libraries["cuda"], "KVCACHE_DEVICE_TYPE": "cuda",
           "KVCACHE_DEVICE_CHUNK_BYTES": "1000"}
    res = run_python(FASTDEPLOY.format(transport="tcp"), env, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("ok")


LIFETIMES = """
import ctypes, os, threading, time
import numpy as np
from kvcache import LLMException, LLMStatusCode, TransferEngine
from kvcache.device.runtime import D2H, H2D, DeviceRuntime
from kvcache.engine import TransferEngine as HostEngine

N = 10_000
double = ctypes.CDLL(os.environ["KVCACHE_CUDA_LIB"])
rt = DeviceRuntime("cuda", 0)
a = TransferEngine("a", transport={transport!r}, device_chunk_size=1000)
b = TransferEngine("b", transport={transport!r}, device_chunk_size=1000)
a_dev, b_dev = rt.alloc(N), rt.alloc(N)
a_host = np.zeros(N, np.uint8)
a_dev_id = a.register_memory(a_dev.ptr, N, device="cuda")
a_host_id = a.register_memory(a_host.ctypes.data, N)
b.register_memory(b_dev.ptr, N, device="cuda")
data = np.random.default_rng(5).integers(0, 256, N, dtype=np.uint8)
rt.copy(b_dev.ptr, data.ctypes.data, N, H2D)
peer = a.connect(b.address, timeout_ms=10_000)

def refused(code, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except LLMException as exc:
        assert exc.status_code == code, exc
        return
    raise AssertionError(f"{{call.__name__}} was not refused")

def slowly(target, *args):
    # Every device copy takes 50 ms: ten chunks keep the transfer going.
    double.fake_cudart_set_copy_delay_us(ctypes.c_long(50_000))
    result = {{}}
    def run():
        try:
            result["ret"] = target(*args)
        except LLMException as exc:
            result["err"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    # In flight once it pins our host memory (it holds the pin to its end).
    give_up = time.monotonic() + 30
    while not a.registry.pinned().get(a_host_id) and not result:
        assert time.monotonic() < give_up, "the transfer never started"
        time.sleep(0.001)
    assert not result, result
    return thread, result

# Our host memory released while a staged read fills it: the release waits
# until the read stopped touching it (its next chunk is refused), and memory
# registered there afterwards gets none of its bytes.
thread, result = slowly(a.transfer_sync, peer, "read", [a_host.ctypes.data], [b_dev.ptr], [N],
                        30_000)
a.unregister_memory(a_host_id, timeout_ms=10_000)
a_host_id = a.register_memory(a_host.ctypes.data, N)
a_host[:] = 0x11
thread.join(30)
double.fake_cudart_set_copy_delay_us(ctypes.c_long(0))
assert "err" in result and not thread.is_alive(), result
assert (a_host == 0x11).all(), int((a_host != 0x11).sum())
print("released under a transfer")

# Host and device regions released together, all or none.
refused(LLMStatusCode.LLM_PARAM_INVALID, a.unregister_memory, [a_host_id, 1 << 50])
assert any(r == a_host_id for r, _, _ in a.regions())
a.unregister_memory([a_host_id, a_dev_id])
assert not any(r in (a_host_id, a_dev_id) for r, _, _ in a.regions() + a.device_regions())
print("all or none")

# A range past the end of the address space changes nothing.
refused(LLMStatusCode.LLM_PARAM_INVALID, a.register_memory, (1 << 64) - 100, 1000,
        device="cuda")
assert a.device_regions() == []

# A peer on the host engine (no device memory) registering memory after the link.
h = HostEngine("h", transport={transport!r})
h_peer = a.connect(h.address, timeout_ms=10_000)
h_host = np.zeros(N, np.uint8)
h.register_memory(h_host.ctypes.data, N)
a_host2 = np.frombuffer(data.tobytes(), np.uint8).copy()
a.register_memory(a_host2.ctypes.data, N)
a.transfer_sync(h_peer, "write", [a_host2.ctypes.data], [h_host.ctypes.data], [N])
assert (h_host == data).all()
for engine in (a, b, h):
    engine.close()
print("ok")
"""


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_memory_released_under_a_staged_transfer_gets_none_of_its_bytes_afterwards(transport,
                                                                                   libraries):
    res = run_python(LIFETIMES.format(transport=transport),
                     {"KVCACHE_CUDA_LIB": libraries["cuda"]}, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("ok"), res.stdout


NO_CUDA = """
import numpy as np
from kvcache.compat.mooncake import TransferEngine
from pyverbs_kv import cuda

engine = TransferEngine()
assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
buffer = np.zeros(4096, np.uint8)
assert engine.register_memory(buffer.ctypes.data, buffer.nbytes) == 0
assert engine.register_memory(16, 4096) == -1          # no memory at all there
engine.close()
print("loaded", cuda.library_path())
"""


def test_a_process_that_never_used_cuda_loads_no_cuda_runtime_to_place_memory(libraries):
    # A CUDA runtime the process could load is there; it must stay unloaded.
    res = run_python(NO_CUDA, {"KVCACHE_CUDA_LIB": libraries["cuda"],
                               "KVCACHE_DEVICE_TYPE": None})
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("loaded None"), res.stdout
