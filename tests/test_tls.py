"""TLS for the control channel and the data lanes: a CA, certificates and
keys made here with the openssl command line; a recording proxy between the
two engines shows what crosses the wire."""
import os
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMException, LLMRole,
                     LLMStatusCode, TransferEngine)
from test_inputs import cluster_info, datadist

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")

MARK = b"PROMPT-SECRET-0123456789"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """{"ca", "a.crt", "a.key", "b.crt", "b.key", "rogue.crt", "rogue.key"}:
    a and b signed by the CA, rogue self-signed."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    for name in ("a", "b"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile",
                 f"{name}.ext", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out",
             "rogue.crt", "-days", "1", "-subj", "/CN=rogue", cwd=d)
    return {name: str(d / name) for name in ("ca.crt", "a.crt", "a.key", "b.crt", "b.key",
                                               "rogue.crt", "rogue.key")}


class Proxy:
    """Forwards one port to another, keeping every byte it carries."""

    def __init__(self, target_port):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        self.seen = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def _tls(pki, name, ca=True):
    return {"tls_cert": pki[f"{name}.crt"], "tls_key": pki[f"{name}.key"],
            "tls_ca": pki["ca.crt"] if ca else None}


def _move(a, b, address, lanes):
    """b links to ``address`` (a, maybe through the proxy), writes MARK into a
    and reads it back; returns what b read."""
    theirs = np.zeros(4096, dtype=np.uint8)
    a.register_memory(theirs.ctypes.data, theirs.nbytes)
    mine = np.zeros(8192, dtype=np.uint8)
    mine[:len(MARK)] = np.frombuffer(MARK, dtype=np.uint8)
    b.register_memory(mine.ctypes.data, mine.nbytes, remote_accessible=False)
    peer = b.connect(address, timeout_ms=10_000)
    b.transfer_sync(peer, "write", [mine.ctypes.data], [theirs.ctypes.data], [4096])
    assert bytes(theirs[:len(MARK)]) == MARK
    b.transfer_sync(peer, "read", [mine.ctypes.data + 4096], [theirs.ctypes.data], [4096])
    assert (peer.data.lanes.idle != []) == lanes        # the data went over a lane or not
    return bytes(mine[4096:4096 + len(MARK)])


@pytest.mark.parametrize("lanes", [True, False], ids=["lanes", "control-channel"])
def test_tls_carries_links_and_data_encrypted(pki, lanes):
    with TransferEngine("a", **_tls(pki, "a")) as a, \
            TransferEngine("b", listen=None, **_tls(pki, "b")) as b:
        proxy = Proxy(int(a.address.rsplit(":", 1)[1]))
        if lanes:                            # lanes come through the proxy too
            a.transport.engine.listen_port = lambda: proxy.port
        else:                                # no lanes granted: the control channel
            a.transport.engine.listen_port = lambda: 0
        try:
            assert _move(a, b, f"127.0.0.1:{proxy.port}", lanes=lanes) == MARK
            with proxy.lock:
                seen = bytes(proxy.seen)
            assert len(seen) > 8192 and MARK not in seen and b"engine.regions" not in seen
        finally:
            proxy.close()


def test_without_tls_the_same_proxy_sees_the_bytes():
    with TransferEngine("a") as a, TransferEngine("b", listen=None) as b:
        proxy = Proxy(int(a.address.rsplit(":", 1)[1]))
        a.transport.engine.listen_port = lambda: proxy.port
        try:
            assert _move(a, b, f"127.0.0.1:{proxy.port}", lanes=True) == MARK
            assert MARK in bytes(proxy.seen)       # the test above can fail
        finally:
            proxy.close()


@pytest.mark.parametrize("who", ["rogue", "no-certificate", "plaintext"])
def test_an_initiator_the_ca_did_not_sign_gets_no_link(pki, who):
    with TransferEngine("a", **_tls(pki, "a")) as a:
        if who == "rogue":
            options = {"tls_cert": pki["rogue.crt"], "tls_key": pki["rogue.key"],
                       "tls_ca": pki["ca.crt"]}
        elif who == "no-certificate":
            options = {"tls_ca": pki["ca.crt"]}
        else:
            options = {}
        with TransferEngine("b", listen=None, **options) as b:
            with pytest.raises(LLMException) as err:
                b.connect(a.address, timeout_ms=3000)
            assert err.value.status_code in (LLMStatusCode.LLM_LINK_FAILED,
                                              LLMStatusCode.LLM_TIMEOUT)
            assert a.peers() == []


def test_an_initiator_refuses_a_listener_the_ca_did_not_sign(pki):
    with TransferEngine("rogue", tls_cert=pki["rogue.crt"], tls_key=pki["rogue.key"]) as a, \
            TransferEngine("b", listen=None, **_tls(pki, "b")) as b:
        with pytest.raises(LLMException) as err:
            b.connect(a.address, timeout_ms=3000)
        assert err.value.status_code == LLMStatusCode.LLM_LINK_FAILED
        assert "certificate" in str(err.value).lower()


def test_tls_settings_come_from_the_environment(pki, monkeypatch):
    monkeypatch.setenv("KVCACHE_TLS_CERT", pki["a.crt"])
    monkeypatch.setenv("KVCACHE_TLS_KEY", pki["a.key"])
    monkeypatch.setenv("KVCACHE_TLS_CA", pki["ca.crt"])
    with TransferEngine("a") as a, TransferEngine("b", listen=None) as b:
        assert _move(a, b, a.address, lanes=True) == MARK
    monkeypatch.setenv("KVCACHE_TLS_KEY", os.devnull)
    with pytest.raises(LLMException) as err:
        TransferEngine("bad")
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID


def test_llm_datadist_links_and_pulls_over_tls(pki):
    prompt = datadist(LLMRole.PROMPT, 1, "tcp", listen="127.0.0.1:0", **_tls(pki, "a"))
    decoder = datadist(LLMRole.DECODER, 2, "tcp", **_tls(pki, "b"))
    try:
        desc = CacheDesc(2, DataType.DT_UINT8, [4, 4096])
        src = prompt.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(1))
        for i, tensor in enumerate(src.tensors()):
            tensor[:] = np.arange(4 * 4096, dtype=np.uint8).reshape(4, 4096) + i
        dst = decoder.cache_manager.allocate_blocks_cache(desc)
        host, port = prompt.listen_address.rsplit(":", 1)
        ret, rets = decoder.link_clusters([cluster_info(1, host, int(port))], timeout=5000)
        assert ret == LLMStatusCode.LLM_SUCCESS and rets == [LLMStatusCode.LLM_SUCCESS]
        decoder.cache_manager.pull_blocks(BlocksCacheKey(1), dst, [0, 1, 2, 3], [3, 2, 1, 0])
        for got, want in zip(dst.tensors(), src.tensors()):
            np.testing.assert_array_equal(got, want[::-1])
    finally:
        decoder.finalize()
        prompt.finalize()


def test_a_trickled_tls_handshake_ends_at_the_handshake_deadline(pki):
    with TransferEngine("a", handshake_timeout_ms=1000, **_tls(pki, "a")) as a:
        s = socket.create_connection(("127.0.0.1", int(a.address.rsplit(":", 1)[1])))
        started = time.monotonic()
        try:
            for byte in b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64):
                s.sendall(bytes([byte]))            # a ClientHello, a byte every 0.2 s
                time.sleep(0.2)
        except OSError:
            pass
        s.settimeout(5)
        try:
            closed = s.recv(1) == b""
        except OSError:
            closed = True
        took = time.monotonic() - started
        s.close()
        assert closed and took < 3.5, took
