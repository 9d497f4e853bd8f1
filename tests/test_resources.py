"""What an engine holds it gives back: threads, file descriptors, listening
sockets, mappings, listen ports and peer-table entries, counted from /proc.

Covers: TransferEngine and LLMDataDist create/close cycles (and whole
link/transfer/close cycles) leave the process as they found it; stop_listening,
finalize and switch_role really close the listen port (it can be listened
on again at once and takes no new links); links whose peer died or left do
not stay in the listener's peer table."""
import fcntl
import mmap
import os
import re
import select
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist,
                     LLMException, LLMRole, LLMStatusCode, TransferEngine)
from helpers import wait_until, watchdog
from test_inputs import (HELLO, HELLO_ACK, READY, assert_link_works, cluster_info, hello,
                         port_of, recv_wire_frame, registered, wire_frame)

TRANSPORTS = ["tcp", "shm"]
TINY_POOL = '{"buf_pool_size": 2097152}'
TEST_DEADLINE_S = 120          # a hung test fails instead of hanging the run
SETTLE_S = 5                   # how long threads and sockets may take to go away

# How much each count may drift over a whole test without it being a leak
# (the allocator may add an arena or two when threads come and go).
SLACK = {"threads": 3, "fds": 3, "unix listeners": 1, "maps": 32}


@pytest.fixture(autouse=True)
def _deadline():
    """Fail (not hang) a test that runs past TEST_DEADLINE_S."""
    with watchdog(TEST_DEADLINE_S):
        yield


# --- counting what this process holds -----------------------------------------------

def _socket_inodes():
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    return inodes


def _unix_listeners():
    """Listening Unix sockets that are ours: open in our descriptor table, or
    named after our pid (a socket whose descriptor was closed while a thread
    still sits in accept() on it lingers, listening, under its name)."""
    ours = _socket_inodes()
    pid = re.compile(rf"(?<!\d){os.getpid()}(?!\d)")
    count = 0
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) < 7 or not int(fields[3], 16) & 0x10000:     # __SO_ACCEPTCON
                continue
            path = fields[7] if len(fields) > 7 else ""
            if fields[6] in ours or pid.search(path):
                count += 1
    return count


def resources():
    with open("/proc/self/maps") as maps:
        map_count = sum(1 for _ in maps)
    return {"threads": len(os.listdir("/proc/self/task")),
            "fds": len(os.listdir("/proc/self/fd")),
            "unix listeners": _unix_listeners(),
            "maps": map_count}


def assert_back_to(baseline, what):
    """Every count returns to ``baseline`` (within SLACK) within SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = resources()
        grown = {k: now[k] - baseline[k] for k in baseline if now[k] - baseline[k] > SLACK[k]}
        if not grown:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} leaked: grew by {grown} (baseline {baseline}, "
                                 f"now {now})")
        time.sleep(0.05)


RUNAWAY = 50                  # growth that fails a cycle test early (keeps it short)


def run_cycles(cycle, count, what, warm_up=5):
    """``cycle(i)`` ``count`` times after ``warm_up`` rounds; then every count
    must settle back to where it was after the warm-up. A count that runs
    away fails the test early."""
    for i in range(warm_up):             # whatever is created once per process
        cycle(i)
    baseline = resources()
    for i in range(count):
        cycle(i)
        if i % 25 == 24:
            now = resources()
            runaway = {k: now[k] - baseline[k] for k in ("threads", "unix listeners")
                       if now[k] - baseline[k] > RUNAWAY}
            if runaway:
                raise AssertionError(f"{what}: after {i + 1} of {count} cycles, grew by "
                                     f"{runaway} (baseline {baseline}, now {now})")
    assert_back_to(baseline, what)


# === 9. create/close cycles leave nothing behind ===================================

ENGINE_CYCLES = 1000          # today: +661 threads (tcp); +1755 threads, +1000 sockets (shm)
DATADIST_CYCLES = 200         # today: +189 threads (tcp); +382 threads, +200 sockets (auto)
LINK_CYCLES = 1000            # two engines, a link, one write and one read, close both
RDMA_LINK_CYCLES = 100        # the same over RDMA (QPs, CQs, MRs), in the VM lane


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_engine_create_close_cycles_leave_nothing_behind(transport):
    def cycle(i):
        TransferEngine(f"cycle-{i}", transport=transport).close()

    run_cycles(cycle, ENGINE_CYCLES,
               f"{ENGINE_CYCLES} TransferEngine create/close cycles ({transport})", warm_up=10)


@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_llm_datadist_init_finalize_cycles_leave_nothing_behind(transport):
    def cycle(i):
        dd = LLMDataDist(LLMRole.PROMPT, 1)
        cfg = LLMConfig()
        cfg.listen_ip_info = "127.0.0.1:0"
        cfg.transport = transport
        cfg.buf_pool_cfg = TINY_POOL
        dd.init(cfg.generate_options())
        dd.finalize()

    run_cycles(cycle, DATADIST_CYCLES,
               f"{DATADIST_CYCLES} LLMDataDist init/finalize cycles ({transport})")


FAILED_INITS = 20


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_init_failing_after_its_cache_manager_leaves_nothing_behind(transport):
    # The listen port is taken: init fails after the pool, the engine and
    # the cache manager were made; every part must go, and init works later.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cfg = LLMConfig()
    cfg.listen_ip_info = f"127.0.0.1:{taken.getsockname()[1]}"
    cfg.transport = transport
    cfg.buf_pool_cfg = TINY_POOL
    dd = LLMDataDist(LLMRole.PROMPT, 1)

    def cycle(i):
        with pytest.raises(LLMException) as err:
            dd.init(cfg.generate_options())
        assert "127.0.0.1" in str(err.value)
        with pytest.raises(LLMException) as err:
            dd.cache_manager
        assert err.value.status_code == LLMStatusCode.LLM_ENGINE_FINALIZED

    with taken:
        run_cycles(cycle, FAILED_INITS, f"{FAILED_INITS} failed inits ({transport})",
                   warm_up=2)
    cfg.listen_ip_info = "127.0.0.1:0"
    dd.init(cfg.generate_options())
    try:
        _pull_one_block(dd, transport, port_of(dd.listen_address))
    finally:
        dd.finalize()


@pytest.fixture(scope="module")
def shared_buffer():
    """1 MiB of sealed memfd memory, mapped here: registered with share=, the
    shared-memory transport maps it into the peer (here: this process)."""
    size = 1 << 20
    fd = os.memfd_create("kv-resources-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    mapping = mmap.mmap(fd, size)
    held = {"buf": np.frombuffer(mapping, dtype=np.uint8), "fd": fd}
    yield held
    held.clear()                    # the array's export, before the mapping goes
    mapping.close()
    os.close(fd)


def _rdma_objects():
    """QPs, MRs, PDs and CQs the kernel holds (all processes: the VM runs
    nothing else)."""
    out = subprocess.run(["rdma", "resource", "show"], capture_output=True, text=True,
                         check=True).stdout.split()
    return {k: int(out[i + 1]) for i, k in enumerate(out) if k in ("qp", "mr", "pd", "cq")}


@pytest.mark.parametrize("transport", TRANSPORTS + [pytest.param("rdma",
                                                                 marks=pytest.mark.rdma)])
def test_link_transfer_close_cycles_leave_nothing_behind(transport, shared_buffer):
    cycles = RDMA_LINK_CYCLES if transport == "rdma" else LINK_CYCLES
    verbs_before = _rdma_objects() if transport == "rdma" else None
    buf, fd = shared_buffer["buf"], shared_buffer["fd"]
    half = buf.size // 2
    a_mem, b_mem = buf[:half], buf[half:]

    def cycle(i):
        a = TransferEngine(f"cyc-a-{i}", transport=transport)
        b = TransferEngine(f"cyc-b-{i}", transport=transport)
        try:
            a.register_memory(a_mem.ctypes.data, half, share=(fd, 0))
            b.register_memory(b_mem.ctypes.data, half, share=(fd, half))
            peer = b.connect(a.address, timeout_ms=5000)
            b_mem[:64] = i % 251
            b.transfer_sync(peer, "write", [b_mem.ctypes.data], [a_mem.ctypes.data], [64],
                            timeout_ms=5000)
            assert (a_mem[:64] == i % 251).all()
            back = wait_until(lambda: [p for p in a.peers() if p.state.name == "LINKED"],
                              5, "the inbound link")[0]
            a.transfer_sync(back, "read", [a_mem.ctypes.data + 64],
                            [b_mem.ctypes.data], [64], timeout_ms=5000)
            assert (a_mem[64:128] == i % 251).all()
        finally:
            b.close()
            a.close()

    run_cycles(cycle, cycles, f"{cycles} link/transfer/close cycles ({transport})")
    if verbs_before is not None:
        assert _rdma_objects() == verbs_before


# === 10. a closed listener really closes its port =================================

def _port_refuses(port):
    """Whether a connection to 127.0.0.1:port is refused right now. One try
    only: a connection that gets through is the evidence (and may itself
    wake a stuck accept thread, which would hide the bug from a retry)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stop_listening_closes_the_port_and_takes_no_new_links(transport):
    # Today the accept thread sits in accept() on the closed socket: the port
    # stays open and the next link is still accepted.
    with TransferEngine("stopped", transport=transport) as server, \
            TransferEngine("early", transport=transport, listen=None) as early, \
            TransferEngine("late", transport=transport, listen=None) as late:
        theirs = registered(server, 4096)
        mine = registered(early, 4096)
        # A link made before: the accept loop runs (and is back in accept()).
        existing = early.connect(server.address, timeout_ms=3000)
        time.sleep(0.2)
        port = port_of(server.address)
        server.stop_listening()
        with pytest.raises(LLMException) as err:
            late.connect(f"127.0.0.1:{port}", timeout_ms=2000)
        assert err.value.status_code in (LLMStatusCode.LLM_LINK_FAILED,
                                         LLMStatusCode.LLM_TIMEOUT), err.value
        assert [p.name for p in server.peers()] == ["early"]
        assert _port_refuses(port), f"port {port} still takes connections after stop_listening"
        assert_link_works(early, existing, mine, theirs)      # existing links stay
        # And it listens again on the same port.
        server.start_listening(f"127.0.0.1:{port}")
        assert port_of(server.address) == port
        late_mem = registered(late, 4096)
        peer = late.connect(f"127.0.0.1:{port}", timeout_ms=3000)
        assert_link_works(late, peer, late_mem, theirs, fill=0x21)


def _prompt(listen, transport, switchable=False):
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    cfg = LLMConfig()
    cfg.listen_ip_info = listen
    cfg.transport = transport
    cfg.buf_pool_cfg = TINY_POOL
    cfg.enable_switch_role = switchable
    dd.init(cfg.generate_options())
    return dd


def _pull_one_block(prompt, transport, port):
    """A decoder links to the prompt at ``port`` and pulls a block."""
    desc = CacheDesc(2, DataType.DT_UINT8, [4, 64])
    remote = prompt.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(1))
    for t, tensor in enumerate(remote.tensors()):
        tensor[:] = 0x40 + t
    decoder = LLMDataDist(LLMRole.DECODER, 2)
    cfg = LLMConfig()
    cfg.transport = transport
    cfg.buf_pool_cfg = TINY_POOL
    decoder.init(cfg.generate_options())
    try:
        local = decoder.cache_manager.allocate_blocks_cache(desc)
        ret, rets = decoder.link_clusters([cluster_info(1, "127.0.0.1", port)], timeout=3000)
        assert rets == [LLMStatusCode.LLM_SUCCESS], rets
        decoder.cache_manager.pull_blocks(BlocksCacheKey(1), local, [2], [3],
                                          tensor_num_per_layer=1)
        assert (local.tensors()[1][3] == 0x41).all()
    finally:
        decoder.finalize()
    prompt.cache_manager.deallocate_cache(remote)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_finalize_then_init_on_the_same_port_succeeds_every_time(transport):
    # Today init fails (the port is still taken by the old listener, whose
    # accept thread still sits in accept()) 19 times in 20.
    rounds = 10
    dd = _prompt("127.0.0.1:0", transport)
    port = port_of(dd.listen_address)
    try:
        for i in range(rounds):
            dd.finalize()
            try:
                dd = _prompt(f"127.0.0.1:{port}", transport)
            except LLMException as exc:
                dd = None
                raise AssertionError(
                    f"round {i}: init on port {port} after finalize: {exc}") from None
            assert port_of(dd.listen_address) == port
        _pull_one_block(dd, transport, port)
        dd.finalize()
        dd = None
        assert _port_refuses(port), f"port {port} still takes connections after finalize"
    finally:
        if dd is not None:
            dd.finalize()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_switch_role_prompt_decoder_prompt_on_the_same_address(transport):
    # Today the second PROMPT cannot listen on its old address (still held by
    # the accept thread) and the switch leaves it not listening at all.
    dd = _prompt("127.0.0.1:0", transport, switchable=True)
    try:
        address = dd.listen_address
        port = port_of(address)
        for i in range(3):
            dd.switch_role(LLMRole.DECODER)
            assert not dd.listen_address
            try:
                dd.switch_role(LLMRole.PROMPT, {"llm.ListenIpInfo": address})
            except LLMException as exc:
                raise AssertionError(f"round {i}: back to PROMPT on {address}: {exc} "
                                     f"(now listening on {dd.listen_address!r})") from None
            assert port_of(dd.listen_address) == port
        _pull_one_block(dd, transport, port)
        dd.switch_role(LLMRole.DECODER)
        assert _port_refuses(port), f"port {port} still takes connections as a decoder"
    finally:
        dd.finalize()


# === 11. links whose peer died or left leave the peer table =======================

PEERS_PER_KIND = 10           # x3 kinds: raw sockets reset, a killed process, orderly close

_CHILD = textwrap.dedent("""
    import sys, time
    from kvcache import TransferEngine
    address, transport, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engines = []
    for i in range(count):
        engine = TransferEngine(f"doomed-{i}", transport=transport, listen=None)
        engine.connect(address, timeout_ms=5000)
        engines.append(engine)
    print("linked", flush=True)
    time.sleep(60)
""")


def _raw_peer(server, name, transport):
    """A socket linked to ``server`` by the handshake, made by hand."""
    s = socket.create_connection(("127.0.0.1", port_of(server.address)), timeout=5)
    s.sendall(wire_frame(HELLO, 0, hello(name, transport, [])))
    frame = recv_wire_frame(s)
    assert frame is not None and frame[0] == HELLO_ACK and frame[2]["status"] == 0, frame
    s.sendall(wire_frame(READY, 0, {}))
    return s


def _linked_names(server):
    return {p.name for p in server.peers() if p.state.name == "LINKED"}


def _spawn_doomed(address, transport, count):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, address, transport, str(count)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or child.poll() is not None:
            child.kill()
            out, err = child.communicate(timeout=10)
            raise AssertionError(f"the child did not link: {line + out!r} {err.decode()}")
        if select.select([child.stdout], [], [], left)[0]:
            chunk = os.read(child.stdout.fileno(), 64)
            if not chunk:
                continue
            line += chunk
    assert line.strip() == b"linked", line
    return child


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_links_whose_peer_died_or_left_leave_the_peer_table(transport):
    # Today every dead link stays, FAILED, for ever (351 entries after 300
    # links came and went).
    with TransferEngine("hub", transport=transport) as hub, \
            TransferEngine("survivor", transport=transport, listen=None) as survivor:
        theirs, mine = registered(hub, 4096), registered(survivor, 4096)
        live = survivor.connect(hub.address, timeout_ms=3000)
        # Peers whose connection is reset (a crashed process, by hand).
        raw = [_raw_peer(hub, f"raw-{i}", transport) for i in range(PEERS_PER_KIND)]
        wait_until(lambda: {f"raw-{i}" for i in range(PEERS_PER_KIND)} <= _linked_names(hub),
                   5, "the hand-made links")
        for s in raw:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            s.close()                                       # RST
        # A process holding several links, killed.
        child = _spawn_doomed(hub.address, transport, PEERS_PER_KIND)
        try:
            wait_until(lambda: {f"doomed-{i}" for i in range(PEERS_PER_KIND)}
                       <= _linked_names(hub), 5, "the child's links")
        finally:
            child.kill()
            child.communicate(timeout=10)
        # Peers that unlink in order.
        for i in range(PEERS_PER_KIND):
            with TransferEngine(f"polite-{i}", transport=transport, listen=None) as polite:
                polite.connect(hub.address, timeout_ms=3000)
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            if [p.name for p in hub.peers()] == ["survivor"]:
                break
            time.sleep(0.05)
        left = sorted(f"{p.name}:{p.state.name}" for p in hub.peers())
        assert left == ["survivor:LINKED"], f"{len(left)} peers in the table: {left}"
        assert_link_works(survivor, live, mine, theirs)
