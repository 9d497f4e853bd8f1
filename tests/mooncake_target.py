"""The target side of the Mooncake-compatibility tests, as a process of its own
(like Mooncake's transfer_engine_target.py): it initializes a
kvcache.compat.mooncake.TransferEngine and answers JSON commands, one per
line on stdin, with one JSON line on stdout.

    python tests/mooncake_target.py PROTOCOL METADATA_SERVER HOST
    -> {"segment": "host:port", "first": first buffer address}
    {"cmd": "read", "addr": A, "len": N}      -> {"hex": "..."}
    {"cmd": "register", "len": N}             -> {"addr": A, "code": 0}
    {"cmd": "unregister", "addr": A}          -> {"code": 0}
    {"cmd": "notifies"}                       -> {"notifies": [[name, msg], ...]}
    {"cmd": "register_device", "len": N}      -> {"addr": A, "code": 0, "device_regions": K}
                                                 (CUDA memory, its location found by
                                                 register_memory)
    {"cmd": "read_device", "addr": A, "len": N} -> {"hex": "..."}
    {"cmd": "fill_device", "addr": A, "hex": "..."} -> {}
    {"cmd": "write_bytes", "addr": A, "hex": "..."} -> {"code": 0}
    {"cmd": "quit"}                           -> {} (then it exits)

``Target`` starts and drives one from a test."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading

import numpy as np

REPLY_TIMEOUT_S = 60


class Target:
    """A running target process; ``segment`` and ``first`` from its hello."""

    def __init__(self, protocol, metadata_server="P2PHANDSHAKE", host="127.0.0.1", env=None):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root, **(env or {}))
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), protocol, metadata_server, host],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self._reply()
        if "error" in hello:
            self.close()
            raise RuntimeError(f"target failed to initialize: {hello['error']}")
        self.segment, self.first = hello["segment"], hello["first"]

    def _read(self):
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, timeout_s=REPLY_TIMEOUT_S):
        line = self._lines.get(timeout=timeout_s)
        if line is None:
            raise EOFError(f"target exited ({self.process.wait(10)})")
        return json.loads(line)

    def ask(self, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def read(self, addr, length):
        return bytes.fromhex(self.ask(cmd="read", addr=addr, len=length)["hex"])

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def close(self):
        if self.process.poll() is None:
            try:
                self.ask(cmd="quit")
            except (OSError, EOFError, queue.Empty):
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.stdin.close()


def main():
    from kvcache.compat.mooncake import TransferEngine
    from kvcache.device.runtime import D2H, H2D, DeviceRuntime
    runtimes = []

    def device():
        if not runtimes:
            runtimes.append(DeviceRuntime("cuda", 0))
        return runtimes[0]
    protocol, metadata_server, host = sys.argv[1:4]
    engine = TransferEngine(managed_pool_bytes=4 << 20)
    code = engine.initialize(host, metadata_server, protocol, "")
    if code != 0:
        print(json.dumps({"error": code}), flush=True)
        return 1
    segment = engine.get_local_segment_name()
    print(json.dumps({"segment": segment, "first": engine.get_first_buffer_address(segment)}),
          flush=True)
    owned = {}
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request["cmd"]
        if cmd == "read":
            reply = {"hex": engine.read_bytes_from_buffer(request["addr"], request["len"]).hex()}
        elif cmd == "register":
            buffer = np.zeros(request["len"], dtype=np.uint8)
            owned[buffer.ctypes.data] = buffer
            reply = {"addr": buffer.ctypes.data,
                     "code": engine.register_memory(buffer.ctypes.data, buffer.nbytes)}
        elif cmd == "register_device":
            buffer = device().alloc(request["len"])
            owned[buffer.ptr] = buffer
            reply = {"addr": buffer.ptr,
                     "code": engine.register_memory(buffer.ptr, request["len"]),
                     # Found as device memory, not taken for host memory.
                     "device_regions": len(engine._engine.device_regions())}
        elif cmd == "read_device":
            out = np.zeros(request["len"], dtype=np.uint8)
            device().copy(out.ctypes.data, request["addr"], out.nbytes, D2H)
            reply = {"hex": out.tobytes().hex()}
        elif cmd == "fill_device":
            data = np.frombuffer(bytes.fromhex(request["hex"]), dtype=np.uint8)
            device().copy(request["addr"], data.ctypes.data, data.nbytes, H2D)
            reply = {}
        elif cmd == "write_bytes":
            reply = {"code": engine.write_bytes_to_buffer(request["addr"],
                                                          bytes.fromhex(request["hex"]),
                                                          len(request["hex"]) // 2)}
        elif cmd == "unregister":
            reply = {"code": engine.unregister_memory(request["addr"])}
        elif cmd == "notifies":
            reply = {"notifies": [[n.name, n.msg] for n in engine.get_notifies()]}
        else:
            engine.close()
            print("{}", flush=True)
            return 0
        print(json.dumps(reply), flush=True)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
