"""pyverbs_kv.cuda against a C test double of libcudart (tests/doubles/
fake_cudart.c), loaded through KVCACHE_CUDA_LIB: the dlopen path a real
process takes. Every binding call, every error path (code, cudaGetErrorName,
cudaGetErrorString and the call in the exception), close ordering, pointer
classification, a process where the library or one symbol is missing, and, on
a machine with a GPU, the same copies against the real runtime."""
import ctypes
import textwrap

import numpy as np
import pytest

from accel_doubles import build, gil_free_during, install, run_python
from accel_doubles import calls as count_calls, probe as run_probe, random_bytes as pattern
from pyverbs_kv import cuda

N = 8192


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    lib, env = install(cuda, "fake_cudart.c", "libcudart.so", "KVCACHE_CUDA_LIB", "fake_cudart",
                       tmp_path_factory.mktemp("cudart"))
    lib.cudaFree.argtypes = [ctypes.c_void_p]
    lib.fake_cudart_last_detail.restype = ctypes.c_char_p
    yield lib
    env.undo()


@pytest.fixture
def ctx(fake):
    """A context on device 0; afterwards nothing is left allocated."""
    fake.fake_cudart_reset_calls()
    c = cuda.Context(0)
    yield c
    c.close()
    assert fake.fake_cudart_live_device_blocks() == 0
    assert fake.fake_cudart_live_host_blocks() == 0


def calls(fake, name):
    return count_calls(fake, "fake_cudart", name)


def detail(fake):
    return fake.fake_cudart_last_detail().decode()


def test_device_queries(fake, ctx):
    assert cuda.available() == (True, f"loaded {cuda.library_path()}")
    assert cuda.device_count() == 2
    with cuda.Context(1):
        assert cuda.get_device() == 1
    ctx.make_current()
    assert cuda.get_device() == 0
    with pytest.raises(cuda.CudaError) as err:
        cuda.Context(5)
    e = err.value
    assert (e.call, e.code, e.code_name) == ("cudaSetDevice", 101, "cudaErrorInvalidDevice")
    assert str(e) == ("cudaSetDevice failed: CUDA error 101 (cudaErrorInvalidDevice): "
                      "invalid device ordinal [device=5]")


def test_sync_copies_of_every_kind_move_the_bytes(fake, ctx):
    src = pattern(N, 1)
    dev_a, dev_b, pinned = ctx.alloc(N), ctx.alloc(N), ctx.alloc_host(N)
    out = np.zeros(N, np.uint8)
    ctx.memcpy(dev_a, src, N, cuda.cudaMemcpyHostToDevice)
    ctx.memcpy(dev_b, dev_a, N - 64, cuda.cudaMemcpyDeviceToDevice, dst_offset=64)
    ctx.memcpy(dev_b, dev_a, 64, cuda.cudaMemcpyDefault, src_offset=N - 64)
    ctx.memcpy(pinned, dev_b, N, cuda.cudaMemcpyDeviceToHost)
    ctx.memcpy(out, pinned, N, cuda.cudaMemcpyHostToHost)
    np.testing.assert_array_equal(out, np.roll(src, 64))
    ctx.memset(dev_a, 0x5A, 32, offset=8)
    ctx.memcpy(out, dev_a.ptr, 48, cuda.cudaMemcpyDefault)     # an int address, as data_ptr()
    assert out[:48].tolist() == src[:8].tolist() + [0x5A] * 32 + src[40:48].tolist()
    assert calls(fake, "cudaMemcpy") == 6 and calls(fake, "cudaMemset") == 1


def test_async_copies_land_once_the_stream_is_synchronised(fake, ctx):
    src = pattern(N, 2)
    stream = ctx.create_stream()
    staging, back, dev = ctx.alloc_host(N), ctx.alloc_host(N), ctx.alloc(N)
    np.frombuffer(staging, np.uint8)[:] = src
    ctx.memcpy(dev, staging, N, cuda.cudaMemcpyHostToDevice, stream=stream)
    ctx.memcpy(back, dev, N, cuda.cudaMemcpyDeviceToHost, stream=stream)
    view = np.frombuffer(back, np.uint8)
    assert not view.any()                        # queued, not run (the double runs at sync)
    stream.synchronize()
    np.testing.assert_array_equal(view, src)
    del view
    with pytest.raises(TypeError, match="asynchronous copy needs runtime memory"):
        ctx.memcpy(dev, src, N, cuda.cudaMemcpyHostToDevice, stream=stream)
    assert calls(fake, "cudaMemcpyAsync") == 2 and calls(fake, "cudaStreamSynchronize") == 1


def test_a_copy_kind_that_does_not_match_the_pointers_is_refused(fake, ctx):
    dev, host = ctx.alloc(N), np.zeros(N, np.uint8)
    with pytest.raises(cuda.CudaError) as err:
        ctx.memcpy(dev, host, N, cuda.cudaMemcpyDeviceToHost)
    e = err.value
    assert (e.call, e.code, e.code_name) == ("cudaMemcpy", 1, "cudaErrorInvalidValue")
    assert "invalid argument" in str(e) and "kind=cudaMemcpyDeviceToHost" in str(e)
    assert "is device memory but the copy kind cudaMemcpyDeviceToHost says host" in detail(fake)
    assert cuda.pointer_attributes(dev.ptr).type == "device"   # the last error was reset
    with pytest.raises(ValueError, match="is not a cudaMemcpyKind"):
        ctx.memcpy(dev, host, N, 9)


def test_use_after_free_and_double_free_are_refused(fake, ctx):
    dev, host = ctx.alloc(N), np.zeros(N, np.uint8)
    stale = dev.ptr
    dev.close()
    dev.close()
    assert calls(fake, "cudaFree") == 1
    with pytest.raises(cuda.CudaError) as err:
        ctx.memcpy(host, stale, N, cuda.cudaMemcpyDeviceToHost)
    assert err.value.code_name == "cudaErrorInvalidValue"
    assert "device memory that was freed (use after free)" in detail(fake)

    stream, other, pinned = ctx.create_stream(), ctx.alloc(N), ctx.alloc_host(N)
    ctx.memcpy(pinned, other, N, cuda.cudaMemcpyDeviceToHost, stream=stream)
    assert fake.cudaFree(other.ptr) == 0             # freed behind the binding's back
    with pytest.raises(cuda.CudaError) as err:
        stream.synchronize()
    assert err.value.call == "cudaStreamSynchronize" and "use after free" in detail(fake)
    with pytest.raises(cuda.CudaError) as err:
        other.close()
    assert (err.value.call, err.value.code_name) == ("cudaFree", "cudaErrorInvalidValue")
    assert "double free" in detail(fake)


def test_pointer_attributes_tell_device_from_host(fake, ctx):
    dev, pinned = ctx.alloc(N), ctx.alloc_host(N)
    host = np.zeros(N, np.uint8)
    assert cuda.pointer_attributes(dev.ptr) == ("device", 0, dev.ptr, 0)
    assert cuda.pointer_attributes(dev.ptr + 100).type == "device"
    assert cuda.pointer_attributes(pinned.ptr)[:2] == ("host", 0)
    assert cuda.pointer_attributes(host.ctypes.data) == ("unregistered", -1, 0, 0)
    dev.close()
    assert cuda.pointer_attributes(dev.ptr or 1).type == "unregistered"


def test_close_order_and_limits(fake, ctx):
    dev, pinned, stream = ctx.alloc(N), ctx.alloc_host(N), ctx.create_stream()
    ctx.memcpy(dev, pinned, N, cuda.cudaMemcpyHostToDevice, stream=stream)
    view = memoryview(pinned)
    with pytest.raises(BufferError, match="live buffer views"):
        pinned.close()
    view.release()
    with pytest.raises(ValueError, match="pass the end of a 8192-byte HostBuffer"):
        ctx.memcpy(dev, pinned, 16, cuda.cudaMemcpyHostToDevice, src_offset=N - 8)
    with pytest.raises(cuda.CudaError) as err:
        ctx.alloc(1 << 30)
    assert (err.value.call, err.value.code_name) == ("cudaMalloc", "cudaErrorMemoryAllocation")
    ctx.close()     # a stream destroyed with a queued copy would fail in the double
    assert stream.closed and dev.closed and pinned.closed and ctx.closed
    assert calls(fake, "cudaStreamDestroy") == 1 and calls(fake, "cudaFreeHost") == 1
    with pytest.raises(ValueError, match="Context of device 0 is closed"):
        ctx.alloc(N)


def test_the_gil_is_released_while_cuda_copies(fake, ctx):
    fake.fake_cudart_set_copy_delay_us.argtypes = [ctypes.c_long]
    dev, host = ctx.alloc(N), pattern(N, 5)
    assert gil_free_during(lambda: ctx.memcpy(dev, host, N, cuda.cudaMemcpyHostToDevice),
                           fake.fake_cudart_set_copy_delay_us)


PROBE = textwrap.dedent("""
    import pyverbs_kv.cuda as cuda
    import kvcache
    ok, reason = cuda.available()
    print("AVAILABLE", ok)
    print("REASON", reason)
    try:
        cuda.Context(0)
    except cuda.CudaUnavailable as exc:
        print("RAISED", type(exc).__name__)
    print("KVCACHE", kvcache.LLMStatusCode.LLM_SUCCESS.name)
""")


def probe(env):
    return run_probe(PROBE, env)


def test_a_missing_symbol_turns_the_feature_off_with_its_name(tmp_path):
    path = build("fake_cudart.c", tmp_path, "libcudart.so", omit="cudaMemcpyAsync")
    out = probe({"KVCACHE_CUDA_LIB": path})
    assert out["AVAILABLE"] == "False" and out["RAISED"] == "CudaUnavailable"
    assert out["REASON"] == (f"the CUDA runtime (libcudart) is not available: {path} lacks "
                             "the symbol cudaMemcpyAsync")
    assert out["KVCACHE"] == "LLM_SUCCESS"


def test_a_missing_library_is_named_and_nothing_else_breaks(tmp_path):
    missing = str(tmp_path / "libcudart.so.12")
    out = probe({"KVCACHE_CUDA_LIB": missing})
    assert out["AVAILABLE"] == "False" and out["RAISED"] == "CudaUnavailable"
    assert missing in out["REASON"] and out["KVCACHE"] == "LLM_SUCCESS"


def test_the_standard_names_and_torchs_copy_are_candidates(fake, monkeypatch, tmp_path):
    bundled = tmp_path / "nvidia" / "cuda_runtime" / "lib"
    bundled.mkdir(parents=True)
    (bundled / "libcudart.so.12").write_bytes(b"")
    monkeypatch.delenv("KVCACHE_CUDA_LIB")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cuda.candidates() == ["libcudart.so.13", "libcudart.so.12", "libcudart.so",
                                 str(bundled / "libcudart.so.12")]


# --- On a machine with a GPU: the real runtime, in a process of its own (a process
# loads one libcudart, and this one loaded the double).

def _gpu_reason():
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device here (torch.cuda.is_available() is false)"
    return ""

GPU_CHECK = textwrap.dedent("""
    import numpy as np, torch
    from pyverbs_kv import cuda
    ok, reason = cuda.available()
    assert ok, reason
    n = 1 << 20
    src = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    with cuda.Context(0) as ctx:
        a, b, pinned = ctx.alloc(n), ctx.alloc(n), ctx.alloc_host(n)
        out = np.zeros(n, np.uint8)
        ctx.memcpy(a, src, n, cuda.cudaMemcpyHostToDevice)
        ctx.memcpy(b, a, n, cuda.cudaMemcpyDeviceToDevice)
        ctx.memcpy(out, b, n, cuda.cudaMemcpyDeviceToHost)
        assert (out == src).all(), "sync H2D/D2D/D2H"
        stream = ctx.create_stream()
        np.frombuffer(pinned, np.uint8)[:] = src[::-1]
        ctx.memcpy(a, pinned, n, cuda.cudaMemcpyHostToDevice, stream=stream)
        ctx.memcpy(b, a, n, cuda.cudaMemcpyDeviceToDevice, stream=stream)
        ctx.memcpy(pinned, b, n, cuda.cudaMemcpyDeviceToHost, stream=stream)
        stream.synchronize()
        assert (np.frombuffer(pinned, np.uint8) == src[::-1]).all(), "async on a stream"
        assert cuda.pointer_attributes(a.ptr).type == "device"
        assert cuda.pointer_attributes(pinned.ptr).type == "host"
        t = torch.arange(256, dtype=torch.uint8, device="cuda")
        info = cuda.pointer_attributes(t.data_ptr())
        assert info.type == "device" and info.device == t.device.index, info
        assert cuda.pointer_attributes(torch.zeros(16).data_ptr()).type == "unregistered"
        assert cuda.pointer_attributes(
            torch.zeros(16, pin_memory=True).data_ptr()).type == "host"
        ctx.memcpy(out, t.data_ptr(), 256, cuda.cudaMemcpyDeviceToHost)
        assert out[:256].tolist() == list(range(256)), "a torch tensor's data_ptr()"
    print("GPU OK", cuda.library_path())
""")


@pytest.mark.gpu
def test_real_gpu_copies_and_torch_pointers():
    reason = _gpu_reason()      # here, not at collection: importing torch takes seconds
    if reason:
        pytest.skip(reason)
    res = run_python(GPU_CHECK, {"KVCACHE_CUDA_LIB": None}, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "GPU OK" in res.stdout
