"""rdma_cm: our client and server, and interoperation with rdmacm-utils'
rdma_server / rdma_client (a peer none of us wrote)."""
import os
import subprocess
import sys

import pytest

import pyverbs_kv as pv
from pyverbs_kv.cm import CMID, EventChannel

pytestmark = pytest.mark.rdma

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))


def start(args, **kwargs):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, **kwargs)


def our_server(ip, port):
    proc = start([sys.executable, os.path.join(HERE, "cm_peer.py"), "server", ip, str(port)])
    line = proc.stdout.readline()
    assert line.startswith("listening"), (line, proc.stderr.read())
    return proc


def our_client(ip, port):
    return subprocess.run([sys.executable, os.path.join(HERE, "cm_peer.py"), "client", ip,
                           str(port)], capture_output=True, text=True, timeout=60, env=ENV)


def finish(proc, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_our_client_and_our_server(rdma_ip):
    server = our_server(rdma_ip, 7480)
    client = our_client(rdma_ip, 7480)
    rc, out, err = finish(server)
    assert client.returncode == 0, client.stderr
    assert rc == 0, err
    assert "client got pong:ping-123 private welcome" in client.stdout
    assert "server got ping-1234567890" in out


def test_our_client_against_rdmacm_utils_rdma_server(rdma_ip):
    server = start(["rdma_server", "-s", rdma_ip, "-p", "7481"])
    try:
        for _ in range(20):              # rdma_server may not be listening yet
            client = our_client(rdma_ip, 7481)
            if client.returncode == 0:
                break
        assert client.returncode == 0, client.stderr
        assert "client got" in client.stdout
        rc, out, err = finish(server)
        assert rc == 0, out + err
    finally:
        server.kill()


def test_rdmacm_utils_rdma_client_against_our_server(rdma_ip):
    server = our_server(rdma_ip, 7482)
    client = subprocess.run(["rdma_client", "-s", rdma_ip, "-p", "7482"], capture_output=True,
                            text=True, timeout=60)
    rc, out, err = finish(server)
    assert client.returncode == 0, client.stdout + client.stderr
    assert "rdma_client: end 0" in client.stdout + client.stderr
    assert rc == 0, err
    assert "server got" in out


def test_connect_to_a_port_nobody_listens_on_fails_with_a_named_event(rdma_ip):
    channel = EventChannel()
    cmid = CMID(channel)
    cmid.resolve_addr(rdma_ip, 7499, timeout_ms=2000)
    cmid.resolve_route(timeout_ms=2000)
    ctx = cmid.context
    pd = pv.PD(ctx)
    cq = pv.CQ(ctx, 8)
    cmid.create_qp(pd, cq, cq)
    with pytest.raises(pv.VerbsError, match="RDMA_CM_EVENT_(REJECTED|UNREACHABLE)"):
        cmid.connect(timeout_ms=5000)
    channel.close()


def test_get_request_times_out(rdma_ip):
    channel = EventChannel()
    listener = CMID(channel)
    listener.bind(rdma_ip, 0)
    listener.listen()
    assert listener.local_port > 0
    with pytest.raises(pv.VerbsTimeout):
        listener.get_request(timeout_ms=200)
    channel.close()
