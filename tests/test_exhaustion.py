"""A peer that knows the secret but misbehaves cannot exhaust the listener:
READ replies it never reads, notifications it floods, a frame it trickles,
file descriptors run out. The listener runs in its own process (its RSS, fds and threads
measured from /proc); the attacker is a raw socket in this one; a
legitimate initiator keeps pulling byte-exact data throughout.

Bounds (listener process, over its state before the attack): RSS +64 MiB,
fds +16, threads +8; a peer that stops reading is dropped within
2 * io_timeout_ms + 3 s."""
import multiprocessing as mp
import os
import resource
import socket
import threading
import time

import numpy as np
import pytest

from helpers import wait_until
from kvcache import LLMException, LLMStatusCode, TransferEngine
from kvcache.transports.tcp.protocol import MsgType, encode
from test_privilege import KEY, Attacker

IO_TIMEOUT_MS = 2000
REGION = 1 << 20
RSS_BOUND = 64 << 20
FD_BOUND = 16
THREAD_BOUND = 8


def _stats():
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return {"rss": int(fields["VmRSS"][0]) * 1024, "threads": int(fields["Threads"][0]),
            "fds": len(os.listdir("/proc/self/fd"))}


def _listener_main(conn, env, nofile):
    os.environ.update(env)
    if nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    engine = TransferEngine("listener", io_timeout_ms=IO_TIMEOUT_MS, auth_key=KEY)
    memory = np.random.default_rng(7).integers(0, 256, REGION, dtype=np.uint8)
    region = engine.register_memory(memory.ctypes.data, REGION)
    conn.send((engine.address, memory.ctypes.data, region))
    hogs = []
    while True:
        try:
            command = conn.recv()
        except EOFError:
            break
        if command == "stats":
            conn.send(dict(_stats(), peers=sorted(p.name for p in engine.peers())))
        elif command == "notifications":
            conn.send([(peer, name, len(message)) for peer, name, message
                       in engine.get_notifications()])
        elif command == "hog":                     # take every free descriptor
            try:
                while True:
                    hogs.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                conn.send(len(hogs))
        elif command == "unhog":
            for fd in hogs:
                os.close(fd)
            hogs.clear()
            conn.send(True)
        elif command == "close":
            break
    engine.close()


class Listener:
    def __init__(self, env=None, nofile=0):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_listener_main, args=(child, env or {}, nofile),
                                   daemon=True)
        self.process.start()
        assert self.conn.poll(60), "the listener did not start"
        self.address, self.addr, self.region = self.conn.recv()

    def ask(self, command):
        self.conn.send(command)
        assert self.conn.poll(30), f"no answer to {command}"
        return self.conn.recv()

    def close(self):
        try:
            self.conn.send("close")
        except OSError:
            pass
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()


class Puller:
    """A legitimate initiator pulling the listener's region in a loop,
    checking every byte."""

    def __init__(self, listener):
        self.engine = TransferEngine("decoder", listen=None, auth_key=KEY,
                                     io_timeout_ms=IO_TIMEOUT_MS)
        self.peer = self.engine.connect(listener.address, timeout_ms=10_000)
        self.expected = np.random.default_rng(7).integers(0, 256, REGION, dtype=np.uint8)
        self.buffer = np.zeros(REGION, dtype=np.uint8)
        self.engine.register_memory(self.buffer.ctypes.data, REGION, remote_accessible=False)
        self.listener = listener
        self.rounds, self.errors = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.buffer[:] = 0
            try:
                self.engine.transfer_sync(self.peer, "read", [self.buffer.ctypes.data],
                                          [self.listener.addr], [REGION], timeout_ms=20_000)
            except LLMException as exc:
                self.errors.append(exc)
                return
            if not np.array_equal(self.buffer, self.expected):
                self.errors.append(AssertionError("pulled bytes differ"))
                return
            self.rounds += 1

    def stop(self):
        self._stop.set()
        self._thread.join(30)
        self.engine.close()
        assert not self.errors, self.errors


def _within_bounds(before, after):
    assert after["rss"] - before["rss"] < RSS_BOUND, (before, after)
    assert after["fds"] - before["fds"] <= FD_BOUND, (before, after)
    assert after["threads"] - before["threads"] <= THREAD_BOUND, (before, after)


@pytest.fixture
def listener():
    server = Listener({"KVCACHE_PEER_MAX_QUEUED_BYTES": str(16 << 20),
                       "KVCACHE_PEER_MAX_NOTIFY_BYTES": str(8 << 20)})
    yield server
    server.close()


def _read_frame(req_id, count, region, addr):
    """A READ of ``count`` one-byte pieces of the listener's region."""
    return (encode(MsgType.READ, req_id, {"count": count, "bytes": count}, count * 24)
            + np.full(count, region, dtype="<u8").tobytes()
            + (addr + np.arange(count, dtype=np.uint64) % REGION).astype("<u8").tobytes()
            + np.ones(count, dtype="<u8").tobytes())


def test_a_peer_that_never_reads_its_read_replies_is_bounded_then_dropped(listener):
    puller = Puller(listener)
    wait_until(lambda: puller.rounds >= 3, 30, "the puller to run")
    before = listener.ask("stats")
    attacker = Attacker(listener.address, "tcp")
    attacker.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peak = [before]
    started = time.monotonic()

    def flood():                       # 40 READs of 2**18 pieces: 240 MiB of tables
        try:
            for i in range(40):
                attacker.sock.sendall(_read_frame(100 + i, 1 << 18, listener.region,
                                                  listener.addr))
        except OSError:
            pass                       # dropped: what the listener should do

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()

    def dropped():
        stats = listener.ask("stats")
        peak.append(stats)
        return "attacker" not in stats["peers"]

    wait_until(dropped, 2 * IO_TIMEOUT_MS / 1000 + 30, "the attacker to be dropped")
    took = time.monotonic() - started
    sender.join(10)
    rounds = puller.rounds
    wait_until(lambda: puller.rounds >= rounds + 3, 30, "the puller to go on")
    puller.stop()
    worst = max(peak, key=lambda s: s["rss"])
    _within_bounds(before, worst)
    print(f"\nunread READ replies: dropped after {took:.1f} s; listener RSS "
          f"+{(worst['rss'] - before['rss']) >> 20} MiB, fds {before['fds']}->"
          f"{worst['fds']}, threads {before['threads']}->{worst['threads']}")
    assert took < 2 * IO_TIMEOUT_MS / 1000 + 20
    attacker.close()


def test_notifications_past_a_peers_cap_are_refused_and_the_oldest_kept(listener):
    puller = Puller(listener)
    before = listener.ask("stats")
    message = bytes(700_000)
    sender = TransferEngine("sender", listen=None, auth_key=KEY)
    try:
        peer = sender.connect(listener.address, timeout_ms=10_000)
        accepted, refused = 0, []
        for i in range(40):                    # 28 MB against a cap of 8 MiB
            try:
                sender.notify(peer, f"n{i}", message)
                accepted += 1
            except LLMException as exc:
                refused.append(exc)
        assert accepted == (8 << 20) // (700_000 + 3)
        assert len(refused) == 40 - accepted
        assert all(e.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY for e in refused)
        assert "not taken yet" in str(refused[0])
        sender.disconnect(peer)
    finally:
        sender.close()
    after = listener.ask("stats")
    got = listener.ask("notifications")
    assert [name for _, name, _ in got] == [f"n{i}" for i in range(accepted)]   # oldest kept
    puller.stop()
    _within_bounds(before, after)
    print(f"\nnotification flood: {accepted} kept, {len(refused)} refused; listener RSS "
          f"+{(after['rss'] - before['rss']) >> 20} MiB")


def test_the_listener_links_again_after_running_out_of_descriptors():
    server = Listener(nofile=256)
    try:
        taken = server.ask("hog")
        assert taken > 0
        # Every accept fails with EMFILE now; the connection waits in the backlog.
        s = socket.create_connection(("127.0.0.1", int(server.address.rsplit(":", 1)[1])),
                                     timeout=5)
        time.sleep(0.5)
        assert server.ask("unhog")
        s.close()
        puller = Puller(server)                 # a real peer links and pulls
        wait_until(lambda: puller.rounds >= 2, 30, "pulls after the fd shortage")
        puller.stop()
    finally:
        server.close()


def test_a_frame_trickled_on_a_link_is_dropped_at_io_timeout(listener):
    attacker = Attacker(listener.address, "tcp")
    wait_until(lambda: "attacker" in listener.ask("stats")["peers"], 10, "the link")
    frame = encode(MsgType.CALL, 1, {"method": "engine.regions", "params": {}})
    started = time.monotonic()
    try:
        for byte in frame:                       # a byte every 0.3 s: never a whole frame
            attacker.sock.sendall(bytes([byte]))
            time.sleep(0.3)
            if "attacker" not in listener.ask("stats")["peers"]:
                break
    except OSError:
        pass
    took = time.monotonic() - started
    wait_until(lambda: "attacker" not in listener.ask("stats")["peers"], 10, "the drop")
    attacker.close()
    print(f"\ntrickled frame: dropped after {took:.1f} s (io_timeout_ms {IO_TIMEOUT_MS})")
    assert took < IO_TIMEOUT_MS / 1000 + 3
