"""pyverbs_kv.acl against a C test double of libascendcl.so (tests/doubles/
fake_ascendcl.c), loaded through KVCACHE_ACL_LIB: the dlopen path a real
process takes. Every binding call, every error path (code, call name and
aclGetRecentErrMsg text in the exception), close ordering, and a process where
the library or one symbol is missing."""
import ctypes
import textwrap
import threading

import numpy as np
import pytest

from accel_doubles import build, gil_free_during, install
from accel_doubles import calls as count_calls, probe as run_probe, random_bytes as pattern
from pyverbs_kv import acl

N = 8192


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    lib, env = install(acl, "fake_ascendcl.c", "libascendcl.so", "KVCACHE_ACL_LIB", "fake_acl",
                       tmp_path_factory.mktemp("acl"))
    lib.aclrtFree.argtypes = [ctypes.c_void_p]
    yield lib
    acl.finalize()
    env.undo()


@pytest.fixture(autouse=True)
def fresh(fake):
    """Each test starts with ACL not initialised and leaves nothing allocated."""
    acl.finalize()
    fake.fake_acl_reset_calls()
    yield
    acl.finalize()
    assert fake.fake_acl_live_device_blocks() == 0
    assert fake.fake_acl_live_host_blocks() == 0


def calls(fake, name):
    return count_calls(fake, "fake_acl", name)


def test_available_reports_the_loaded_library(fake):
    ok, reason = acl.available()
    assert ok and reason == f"loaded {acl.library_path()}"


def test_a_call_before_acl_init_fails_with_acl_error_uninitialize(fake):
    with pytest.raises(acl.AclError) as err:
        acl.device_count()
    e = err.value
    assert (e.call, e.code, e.code_name) == ("aclrtGetDeviceCount", 100001,
                                             "ACL_ERROR_UNINITIALIZE")
    assert "call aclInit first" in str(e)        # aclGetRecentErrMsg's text
    assert "aclrtGetDeviceCount failed: ACL error 100001 (ACL_ERROR_UNINITIALIZE)" in str(e)


def test_init_device_queries_and_finalize_then_init_again(fake):
    acl.init()
    acl.init()                                   # idempotent: one aclInit
    assert calls(fake, "aclInit") == 1 and fake.fake_acl_initialized() == 1
    assert acl.device_count() == 2
    with pytest.raises(acl.AclError) as err:     # no device set in this thread yet
        acl.get_device()
    assert err.value.code_name == "ACL_ERROR_RT_CONTEXT_NULL"
    ctx = acl.Context(1)
    assert acl.get_device() == 1 and fake.fake_acl_device_refs(1) == 1
    acl.finalize()                               # closes ctx first, then aclFinalize
    assert ctx.closed and fake.fake_acl_device_refs(1) == 0
    assert fake.fake_acl_initialized() == 0 and not acl.initialized()
    with acl.Context(0) as again:                # aclInit -> aclFinalize -> aclInit
        assert again.device_id == 0
    assert calls(fake, "aclInit") == 2


def test_acl_initialised_by_someone_else_is_left_to_its_owner(fake):
    lib_init = fake.aclInit
    lib_init.argtypes = [ctypes.c_char_p]
    assert lib_init(None) == 0                   # as torch_npu would
    acl.init()                                   # ACL_ERROR_REPEAT_INITIALIZE taken as done
    assert acl.initialized()
    acl.finalize()
    assert fake.fake_acl_initialized() == 1      # not ours to finalise
    assert fake.aclFinalize() == 0


def test_a_device_that_does_not_exist_is_refused(fake):
    with pytest.raises(acl.AclError) as err:
        acl.Context(7)
    assert (err.value.call, err.value.code, err.value.code_name) == (
        "aclrtSetDevice", 107001, "ACL_ERROR_RT_INVALID_DEVICEID")
    assert "device 7 does not exist" in str(err.value) and "deviceId=7" in str(err.value)


def test_sync_copies_of_all_four_kinds_move_the_bytes(fake):
    src = pattern(N, 1)
    with acl.Context(0) as ctx:
        dev_a = ctx.alloc(N)
        dev_b = ctx.alloc(N, acl.ACL_MEM_MALLOC_NORMAL_ONLY)
        pinned = ctx.alloc_host(N)
        out = np.zeros(N, np.uint8)
        assert dev_a.on_device and not pinned.on_device and dev_a.nbytes == N
        ctx.memcpy(dev_a, src, N, acl.ACL_MEMCPY_HOST_TO_DEVICE)
        ctx.memcpy(dev_b, dev_a, N - 100, acl.ACL_MEMCPY_DEVICE_TO_DEVICE,
                   dst_offset=100, src_offset=0)
        ctx.memcpy(dev_b, dev_a, 100, acl.ACL_MEMCPY_DEVICE_TO_DEVICE, src_offset=N - 100)
        ctx.memcpy(pinned, dev_b, N, acl.ACL_MEMCPY_DEVICE_TO_HOST)
        ctx.memcpy(out, pinned, N, acl.ACL_MEMCPY_HOST_TO_HOST)
        np.testing.assert_array_equal(out, np.roll(src, 100))
        np.testing.assert_array_equal(np.frombuffer(pinned, np.uint8), out)
        ctx.memcpy(dev_a.ptr + 8, bytes(range(8)), 8, acl.ACL_MEMCPY_HOST_TO_DEVICE)  # raw address
        ctx.memcpy(out, dev_a, 16, acl.ACL_MEMCPY_DEVICE_TO_HOST)
        assert out[:16].tolist() == src[:8].tolist() + list(range(8))
    assert calls(fake, "aclrtMemcpy") == 7
    assert calls(fake, "aclrtFree") == 2 and calls(fake, "aclrtFreeHost") == 1


def test_memset_fills_device_memory(fake):
    with acl.Context(0) as ctx:
        dev = ctx.alloc(N)
        ctx.memset(dev, 0xAB, N)
        ctx.memset(dev, 0x01, 10, offset=20)
        out = np.zeros(N, np.uint8)
        ctx.memcpy(out, dev, N, acl.ACL_MEMCPY_DEVICE_TO_HOST)
        expect = np.full(N, 0xAB, np.uint8)
        expect[20:30] = 1
        np.testing.assert_array_equal(out, expect)
        host = np.zeros(16, np.uint8)
        with pytest.raises(acl.AclError) as err:          # ACL sets device memory only
            ctx.memset(host.ctypes.data, 0, 16)
        assert err.value.call == "aclrtMemset" and "is host memory" in str(err.value)


def test_async_copies_land_once_the_stream_is_synchronised(fake):
    src = pattern(N, 2)
    with acl.Context(0) as ctx:
        stream = ctx.create_stream()
        staging, back = ctx.alloc_host(N), ctx.alloc_host(N)
        np.frombuffer(staging, np.uint8)[:] = src
        dev = ctx.alloc(N)
        ctx.memcpy(dev, staging, N, acl.ACL_MEMCPY_HOST_TO_DEVICE, stream=stream)
        ctx.memcpy(back, dev, N, acl.ACL_MEMCPY_DEVICE_TO_HOST, stream=stream)
        view = np.frombuffer(back, np.uint8)
        assert not view.any()                    # queued, not run (the double runs at sync)
        stream.synchronize()
        np.testing.assert_array_equal(view, src)
        del view
        with pytest.raises(TypeError, match="asynchronous copy needs runtime memory"):
            ctx.memcpy(dev, src, N, acl.ACL_MEMCPY_HOST_TO_DEVICE, stream=stream)
        with pytest.raises(acl.AclError) as err:
            ctx.memcpy(back, staging, N, acl.ACL_MEMCPY_HOST_TO_HOST, stream=stream)
        assert err.value.code_name == "ACL_ERROR_RT_FEATURE_NOT_SUPPORT"
        assert err.value.call == "aclrtMemcpyAsync"
    assert calls(fake, "aclrtMemcpyAsync") == 3 and calls(fake, "aclrtDestroyStream") == 1


def test_a_copy_kind_that_does_not_match_the_pointers_is_refused(fake):
    with acl.Context(0) as ctx:
        dev, host = ctx.alloc(N), np.zeros(N, np.uint8)
        with pytest.raises(acl.AclError) as err:
            ctx.memcpy(host, dev, N, acl.ACL_MEMCPY_HOST_TO_DEVICE)
        e = err.value
        assert (e.call, e.code, e.code_name) == ("aclrtMemcpy", 107000,
                                                 "ACL_ERROR_RT_PARAM_INVALID")
        assert "is host memory but the copy kind ACL_MEMCPY_HOST_TO_DEVICE says device" in str(e)
        assert "kind=ACL_MEMCPY_HOST_TO_DEVICE" in str(e)          # the arguments too
        with pytest.raises(acl.AclError, match="is device memory but the copy kind "
                                               "ACL_MEMCPY_HOST_TO_HOST says host"):
            ctx.memcpy(host, dev, N, acl.ACL_MEMCPY_HOST_TO_HOST)
        with pytest.raises(ValueError, match="is not an aclrtMemcpyKind"):
            ctx.memcpy(host, dev, N, 4)


def test_ranges_are_checked_before_the_runtime_is_called(fake):
    with acl.Context(0) as ctx:
        dev, host = ctx.alloc(N), np.zeros(N, np.uint8)
        before = calls(fake, "aclrtMemcpy")
        with pytest.raises(ValueError, match="pass the end of a 8192-byte DeviceBuffer"):
            ctx.memcpy(dev, host, 16, acl.ACL_MEMCPY_HOST_TO_DEVICE, dst_offset=N - 8)
        with pytest.raises(ValueError, match="pass the end of a 100-byte ndarray"):
            ctx.memcpy(dev, host[:100], 101, acl.ACL_MEMCPY_HOST_TO_DEVICE)
        with pytest.raises(TypeError, match="writable"):
            ctx.memcpy(b"read only", dev, 4, acl.ACL_MEMCPY_DEVICE_TO_HOST)
        with pytest.raises(ValueError, match="must be positive"):
            ctx.alloc(0)
        assert calls(fake, "aclrtMemcpy") == before


def test_use_after_free_and_double_free_surface_with_their_codes(fake):
    with acl.Context(0) as ctx:
        dev, host = ctx.alloc(N), np.zeros(N, np.uint8)
        stale = dev.ptr
        dev.close()
        dev.close()                              # idempotent: one aclrtFree
        assert calls(fake, "aclrtFree") == 1 and dev.ptr == 0
        with pytest.raises(acl.AclError, match=r"device memory that was freed \(use after "
                                               r"free\)") as err:
            ctx.memcpy(host, stale, N, acl.ACL_MEMCPY_DEVICE_TO_HOST)
        assert err.value.code == 107000
        with pytest.raises(ValueError, match="DeviceBuffer is closed"):
            ctx.memcpy(host, dev, N, acl.ACL_MEMCPY_DEVICE_TO_HOST)

        # Memory freed behind the binding's back while a copy from it is queued:
        # the synchronisation reports it, and the binding's own free then is a
        # double free.
        stream, other = ctx.create_stream(), ctx.alloc(N)
        pinned = ctx.alloc_host(N)
        ctx.memcpy(pinned, other, N, acl.ACL_MEMCPY_DEVICE_TO_HOST, stream=stream)
        assert fake.aclrtFree(other.ptr) == 0
        with pytest.raises(acl.AclError, match="use after free") as err:
            stream.synchronize()
        assert err.value.call == "aclrtSynchronizeStream"
        with pytest.raises(acl.AclError) as err:
            other.close()
        assert (err.value.call, err.value.code, err.value.code_name) == (
            "aclrtFree", 207002, "ACL_ERROR_RT_MEMORY_FREE")
        assert "double free" in str(err.value)


def test_an_allocation_the_device_cannot_hold_fails_with_its_code(fake):
    with acl.Context(0) as ctx:
        with pytest.raises(acl.AclError) as err:
            ctx.alloc(1 << 30)
        assert (err.value.call, err.value.code_name) == ("aclrtMalloc",
                                                         "ACL_ERROR_RT_MEMORY_ALLOCATION")
        assert "size=1073741824" in str(err.value)


def test_close_order_streams_then_memory_then_the_device(fake):
    ctx = acl.Context(0)
    dev, pinned, stream = ctx.alloc(N), ctx.alloc_host(N), ctx.create_stream()
    np.frombuffer(pinned, np.uint8)[:] = 7
    ctx.memcpy(dev, pinned, N, acl.ACL_MEMCPY_HOST_TO_DEVICE, stream=stream)
    ctx.close()     # a stream destroyed with a queued copy would fail in the double
    assert stream.closed and dev.closed and pinned.closed and ctx.closed
    assert fake.fake_acl_live_device_blocks() == 0 and fake.fake_acl_device_refs(0) == 0
    assert calls(fake, "aclrtSynchronizeStream") == 1
    ctx.close()
    assert calls(fake, "aclrtResetDevice") == 1
    with pytest.raises(ValueError, match="Context of device 0 is closed"):
        ctx.alloc(N)
    with pytest.raises(ValueError, match="Stream is closed"):
        stream.synchronize()


def test_freeing_a_buffer_first_waits_for_queued_copies(fake):
    with acl.Context(0) as ctx:
        stream, dev, pinned = ctx.create_stream(), ctx.alloc(N), ctx.alloc_host(N)
        ctx.memcpy(pinned, dev, N, acl.ACL_MEMCPY_DEVICE_TO_HOST, stream=stream)
        pinned.close()      # synchronises the stream, so the copy never meets freed memory
        assert calls(fake, "aclrtSynchronizeStream") == 1
        stream.synchronize()


def test_a_pinned_buffer_with_live_views_refuses_to_close(fake):
    with acl.Context(0) as ctx:
        pinned = ctx.alloc_host(64)
        view = memoryview(pinned)
        with pytest.raises(BufferError, match="1 live buffer views"):
            pinned.close()
        view.release()
        pinned.close()
        with pytest.raises(ValueError, match="HostBuffer is closed"):
            memoryview(pinned)


def test_another_thread_binds_the_device_on_first_use(fake):
    src = pattern(N, 3)
    with acl.Context(1) as ctx:
        dev = ctx.alloc(N)
        errors = []

        def worker():
            try:
                ctx.memcpy(dev, src, N, acl.ACL_MEMCPY_HOST_TO_DEVICE)
                ctx.memcpy(dev, src, N, acl.ACL_MEMCPY_HOST_TO_DEVICE)
            except Exception as exc:   # noqa: BLE001 - reported to the main thread
                errors.append(exc)

        t = threading.Thread(target=worker)
        t.start()
        t.join(30)
        assert not errors and not t.is_alive()
        assert calls(fake, "aclrtSetDevice") == 2 and fake.fake_acl_device_refs(1) == 2
        out = np.zeros(N, np.uint8)
        ctx.memcpy(out, dev, N, acl.ACL_MEMCPY_DEVICE_TO_HOST)
        np.testing.assert_array_equal(out, src)
    assert fake.fake_acl_device_refs(1) == 0 and calls(fake, "aclrtResetDevice") == 2


def test_the_gil_is_released_while_acl_copies(fake):
    fake.fake_acl_set_copy_delay_us.argtypes = [ctypes.c_long]
    src = pattern(N, 4)
    with acl.Context(0) as ctx:
        dev, pinned, stream = ctx.alloc(N), ctx.alloc_host(N), ctx.create_stream()
        assert gil_free_during(lambda: ctx.memcpy(dev, src, N, acl.ACL_MEMCPY_HOST_TO_DEVICE),
                               fake.fake_acl_set_copy_delay_us)
        ctx.memcpy(pinned, dev, N, acl.ACL_MEMCPY_DEVICE_TO_HOST, stream=stream)
        assert gil_free_during(stream.synchronize, fake.fake_acl_set_copy_delay_us)
        np.testing.assert_array_equal(np.frombuffer(pinned, np.uint8), src)


PROBE = textwrap.dedent("""
    import pyverbs_kv.acl as acl
    import kvcache
    ok, reason = acl.available()
    print("AVAILABLE", ok)
    print("REASON", reason)
    try:
        acl.Context(0)
    except acl.AclUnavailable as exc:
        print("RAISED", type(exc).__name__, isinstance(exc, ImportError))
    print("KVCACHE", kvcache.LLMStatusCode.LLM_SUCCESS.name)
""")


def probe(env):
    return run_probe(PROBE, env)


def test_a_missing_symbol_turns_the_feature_off_with_its_name(tmp_path):
    path = build("fake_ascendcl.c", tmp_path, "libascendcl.so", omit="aclrtMemcpyAsync")
    out = probe({"KVCACHE_ACL_LIB": path})
    assert out["AVAILABLE"] == "False"
    assert out["REASON"] == (f"AscendCL (libascendcl.so) is not available: {path} lacks the "
                             "symbol aclrtMemcpyAsync")
    assert out["RAISED"] == "AclUnavailable True"
    assert out["KVCACHE"] == "LLM_SUCCESS"


def test_a_missing_library_is_named_and_nothing_else_breaks(tmp_path):
    missing = str(tmp_path / "nowhere" / "libascendcl.so")
    out = probe({"KVCACHE_ACL_LIB": missing})
    assert out["AVAILABLE"] == "False"
    assert missing in out["REASON"] and "cannot open shared object file" in out["REASON"]
    assert out["RAISED"] == "AclUnavailable True" and out["KVCACHE"] == "LLM_SUCCESS"


def test_without_any_cann_install_the_standard_places_are_tried(tmp_path):
    out = probe({"KVCACHE_ACL_LIB": None, "ASCEND_HOME_PATH": str(tmp_path),
                 "ASCEND_TOOLKIT_HOME": None, "LD_LIBRARY_PATH": None})
    assert out["AVAILABLE"] == "False"
    for place in (f"{tmp_path}/lib64/libascendcl.so",
                  "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so",
                  "libascendcl.so"):
        assert place in out["REASON"]
    assert out["KVCACHE"] == "LLM_SUCCESS"


def test_the_standard_places_find_a_cann_layout(tmp_path, fake):
    lib64 = tmp_path / "lib64"
    lib64.mkdir()
    build("fake_ascendcl.c", lib64, "libascendcl.so")
    out = probe({"KVCACHE_ACL_LIB": None, "ASCEND_HOME_PATH": str(tmp_path)})
    assert out["AVAILABLE"] == "True" and out["REASON"] == f"loaded {lib64}/libascendcl.so"
