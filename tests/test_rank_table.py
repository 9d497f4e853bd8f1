"""The rank-table link flow (LLMDataDist.link / unlink /
query_register_mem_status): two real processes on 127.0.0.1 call link with
the same rank table, watch the status move PREPARING -> OK, move blocks over
the links and unlink; link/unlink cycles leave nothing behind; a member that
never comes up makes the comm FAILED within the link timeout; bad tables are
refused naming the field."""
import json
import multiprocessing as mp
import os
import socket
import threading
import time

import numpy as np
import pytest

from helpers import wait_until, watchdog
from kv_peer import pattern
from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,
                     LLMDataDist, LLMException, LLMRole, LLMStatusCode, RegisterMemStatus)
from test_inputs import cluster_info

TRANSPORTS = ["tcp", "shm", pytest.param("rdma", marks=pytest.mark.rdma)]
BLOCKS, BLOCK_ELEMS, TENSORS = 32, 256, 4
LINK_TIMEOUT_MS = 20_000                # two interpreters starting on a loaded machine
WAIT_S = 60


def free_port(host="127.0.0.1"):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def table(ip, ports, version="1.2"):
    """A rank table of one server holding one device per rank (ports: the
    device_port of each rank, or None for base port + rank)."""
    devices = []
    for rank, port in enumerate(ports):
        device = {"device_id": str(rank), "device_ip": ip, "rank_id": str(rank)}
        if port is not None:
            device["device_port"] = port
        devices.append(device)
    return json.dumps({"version": version, "server_count": "1", "status": "completed",
                       "server_list": [{"server_id": "1", "host_ip": ip,
                                        "device": devices}]})


def start(role, cluster_id, transport="tcp", listen="", **config):
    dd = LLMDataDist(role, cluster_id)
    cfg = LLMConfig()
    cfg.transport = transport
    cfg.listen_ip_info = listen
    cfg.link_timeout = LINK_TIMEOUT_MS
    cfg.buf_pool_cfg = '{"buf_pool_size": 16777216}'
    for key, value in config.items():
        setattr(cfg, key, value)
    dd.init(cfg.generate_options())
    return dd


def desc():
    return CacheDesc(TENSORS, DataType.DT_FLOAT16, [BLOCKS, BLOCK_ELEMS])


def _prompt_member(events, go, done, transport, rank_table, info):
    """Cluster 1: a blocks cache of known bytes, then (on ``go``) the
    rank-table link; reports what it saw on ``events``."""
    try:
        dd = start(LLMRole.PROMPT, 1, transport)
        cache = dd.cache_manager.allocate_blocks_cache(desc(), BlocksCacheKey(1))
        for i, tensor in enumerate(cache.tensors()):
            tensor.view(np.uint8).reshape(-1)[:] = pattern(1, i, tensor.nbytes)
        events.put(("ready",))
        go.wait(WAIT_S)
        comm_id = dd.link("link", info, rank_table)
        deadline = time.monotonic() + WAIT_S
        status = dd.query_register_mem_status(comm_id)
        while status == RegisterMemStatus.PREPARING and time.monotonic() < deadline:
            time.sleep(0.01)
            status = dd.query_register_mem_status(comm_id)
        events.put(("status", comm_id, status.name))
        done.wait(WAIT_S)
        dd.unlink(comm_id)
        dd.finalize()
        events.put(("finalized",))
    except BaseException as exc:
        events.put(("error", repr(exc)))


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@pytest.fixture
def member_ip(transport, request):
    return request.getfixturevalue("rdma_ip") if transport == "rdma" else "127.0.0.1"


@pytest.mark.parametrize("decoder_listens", [False, True],
                         ids=["member-address-is-the-listener", "an-extra-listener"])
def test_two_processes_link_by_rank_table_pull_and_unlink(transport, member_ip,
                                                          decoder_listens):
    ports = [free_port(member_ip), free_port(member_ip)]
    rank_table = table(member_ip, ports)
    info = {1: 0, 2: 1}
    ctx = mp.get_context("spawn")
    events, go, done = ctx.Queue(), ctx.Event(), ctx.Event()
    child = ctx.Process(target=_prompt_member,
                        args=(events, go, done, transport, rank_table, info), daemon=True)
    child.start()
    dd = start(LLMRole.DECODER, 2, transport,
               listen=f"{member_ip}:0" if decoder_listens else "")
    try:
        with watchdog(3 * WAIT_S):
            cache = dd.cache_manager.allocate_blocks_cache(desc())
            # The link deadline starts at link: both interpreters are up by then.
            assert events.get(timeout=WAIT_S) == ("ready",)
            comm_id = dd.link("link", info, rank_table)
            assert comm_id == 1                  # llm_datadist numbers comms from 1
            # The prompt side has not called link yet: nothing can be linked.
            assert dd.query_register_mem_status(comm_id) == RegisterMemStatus.PREPARING
            with socket.create_connection((member_ip, ports[1]), timeout=5):
                pass                             # we listen at our member address
            go.set()
            wait_until(lambda: dd.query_register_mem_status(comm_id) != RegisterMemStatus
                       .PREPARING, WAIT_S, "comm status leaving PREPARING", 0.01)
            assert events.get(timeout=WAIT_S) == ("status", 1, "OK")
            assert dd.query_register_mem_status(comm_id) == RegisterMemStatus.OK

            src_blocks, dst_blocks = [3, 0, 31, 7], [30, 1, 2, 9]
            dd.cache_manager.pull_blocks(BlocksCacheKey(1), cache, src_blocks, dst_blocks)
            for i, tensor in enumerate(cache.tensors()):
                want = pattern(1, i, tensor.nbytes).reshape(BLOCKS, -1)
                got = tensor.view(np.uint8).reshape(BLOCKS, -1)
                assert np.array_equal(got[dst_blocks], want[src_blocks])

            dd.unlink(comm_id)
            with pytest.raises(LLMException) as err:
                dd.cache_manager.pull_blocks(BlocksCacheKey(1), cache, [0], [0])
            assert err.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
            with pytest.raises(LLMException) as err:
                dd.query_register_mem_status(comm_id)
            assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
            with pytest.raises(ConnectionRefusedError):     # the member address is closed
                socket.create_connection((member_ip, ports[1]), timeout=5).close()
            done.set()
            # The prompt side's own unlink of a comm we already closed succeeds.
            assert events.get(timeout=WAIT_S) == ("finalized",)
    finally:
        go.set()
        done.set()
        child.join(WAIT_S)
        dd.finalize()
    assert child.exitcode == 0


@pytest.mark.parametrize("my_rank", [0, 1], ids=["dialing-side", "accepting-side"])
def test_a_member_that_never_comes_up_fails_the_comm_within_the_link_timeout(my_rank):
    timeout_ms = 1500
    ports = [free_port(), free_port()]
    info = {1: 0, 2: 1}
    cluster = 1 if my_rank == 0 else 2
    dd = start(LLMRole.PROMPT if my_rank == 0 else LLMRole.DECODER, cluster,
               link_timeout=timeout_ms)
    try:
        with watchdog(30):
            began = time.monotonic()
            comm_id = dd.link("lonely", info, table("127.0.0.1", ports))
            assert dd.query_register_mem_status(comm_id) == RegisterMemStatus.PREPARING
            wait_until(lambda: dd.query_register_mem_status(comm_id) != RegisterMemStatus
                       .PREPARING, 20, "comm status leaving PREPARING", 0.01)
            took = time.monotonic() - began
            assert dd.query_register_mem_status(comm_id) == RegisterMemStatus.FAILED
            assert timeout_ms / 1000 - 0.05 <= took < timeout_ms / 1000 + 5
            assert dd.engine.peers() == []
            dd.unlink(comm_id)                   # a FAILED comm unlinks too
            # Its member address is free again; a second comm gets the next id.
            assert dd.link("again", info, table("127.0.0.1", ports)) == comm_id + 1
    finally:
        dd.finalize()


def test_the_base_port_option_places_members_without_a_device_port():
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        base = a.getsockname()[1]
        try:
            b.bind(("127.0.0.1", base + 1))
        except OSError:
            pytest.skip("the port after a free one is taken")
    x = start(LLMRole.PROMPT, 1, rank_table_port=base)
    y = start(LLMRole.DECODER, 2, rank_table_port=base)
    try:
        with watchdog(60):
            rank_table = table("127.0.0.1", [None, None], version="1.0")
            ids = [x.link("c", {1: 0, 2: 1}, rank_table), y.link("c", {1: 0, 2: 1}, rank_table)]
            for dd, comm_id in zip((x, y), ids):
                wait_until(lambda: dd.query_register_mem_status(comm_id) == RegisterMemStatus.OK,
                           30, "comm OK", 0.01)
            assert x.engine.find_peer(2).inbound is False          # rank 0 dialed rank 1
            assert y.engine.find_peer(1).inbound is True
            assert y.engine.address == f"127.0.0.1:{base + 1}"      # base + rank id
    finally:
        x.finalize()
        y.finalize()


def good_table():
    return json.loads(table("127.0.0.1", [40001, 40002]))


def with_change(change):
    t = good_table()
    change(t)
    return json.dumps(t)


BAD_TABLES = {
    "not-json": ("{server_list", "not JSON"),
    "not-an-object": ("[1, 2]", "rank_table must be a JSON object"),
    "no-version": (with_change(lambda t: t.pop("version")), "rank_table.version"),
    "wrong-version": (with_change(lambda t: t.update(version="2.0")), "rank_table.version"),
    "no-server-list": (with_change(lambda t: t.pop("server_list")), "rank_table.server_list"),
    "empty-server-list": (with_change(lambda t: t.update(server_list=[], server_count="0")),
                          "rank_table.server_list"),
    "server-count": (with_change(lambda t: t.update(server_count="2")),
                     "rank_table.server_count"),
    "no-device": (with_change(lambda t: t["server_list"][0].pop("device")),
                  "rank_table.server_list[0].device"),
    "no-device-ip": (with_change(lambda t: t["server_list"][0]["device"][1].pop("device_ip")),
                     "rank_table.server_list[0].device[1].device_ip"),
    "bad-device-ip": (with_change(lambda t: t["server_list"][0]["device"][0].update(
        device_ip="300.1.1.1")), "device[0].device_ip"),
    "no-rank-id": (with_change(lambda t: t["server_list"][0]["device"][0].pop("rank_id")),
                   "rank_table.server_list[0].device[0].rank_id"),
    "bad-rank-id": (with_change(lambda t: t["server_list"][0]["device"][0].update(
        rank_id="zero")), "device[0].rank_id"),
    "repeated-rank": (with_change(lambda t: t["server_list"][0]["device"][1].update(
        rank_id="0")), "rank_id 0 appears twice"),
    "bad-port": (with_change(lambda t: t["server_list"][0]["device"][0].update(
        device_port=70000)), "device[0].device_port"),
    "rank-missing": (with_change(lambda t: t["server_list"][0]["device"].pop()),
                     "no device with rank_id 1"),
}


@pytest.fixture(scope="module")
def lone():
    dd = start(LLMRole.DECODER, 2)
    yield dd
    dd.finalize()


@pytest.mark.parametrize("name", sorted(BAD_TABLES))
def test_a_bad_rank_table_is_refused_naming_the_field(lone, name):
    text, field = BAD_TABLES[name]
    with pytest.raises(LLMException) as err:
        lone.link("link", {1: 0, 2: 1}, text)
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert field in str(err.value)
    assert lone.engine.address is None            # nothing was started


@pytest.mark.parametrize("comm_name, info, field", [
    ("", {1: 0, 2: 1}, "comm_name"),
    ("x" * 128, {1: 0, 2: 1}, "comm_name"),
    (7, {1: 0, 2: 1}, "comm_name"),
    ("link", [(1, 0), (2, 1)], "cluster_rank_info must be a dict"),
    ("link", {2: 1}, "2..16 clusters"),
    ("link", {1: 1, 2: 0}, "ascending"),
    ("link", {1: 0, 2: 0}, "distinct"),
    ("link", {1: "0", 2: 1}, "must be integers"),
    ("link", {1: 0, 3: 1}, "no entry for this cluster"),
])
def test_bad_link_arguments_are_refused(lone, comm_name, info, field):
    with pytest.raises(LLMException) as err:
        lone.link(comm_name, info, json.dumps(good_table()))
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert field in str(err.value)


def test_unknown_comm_ids_and_a_taken_member_address(lone):
    for call in (lone.unlink, lone.query_register_mem_status):
        for comm_id in (99, "1", None):
            with pytest.raises(LLMException) as err:
                call(comm_id)
            assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LLMException) as err:
            lone.link("link", {1: 0, 2: 1}, table("127.0.0.1", [free_port(), port]))
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert f"cannot listen on 127.0.0.1:{port}" in str(err.value)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_link_unlink_cycles_leave_no_thread_or_fd_behind(transport):
    x, y = start(LLMRole.PROMPT, 1, transport), start(LLMRole.DECODER, 2, transport)
    try:
        with watchdog(120):
            def cycle():
                rank_table = table("127.0.0.1", [free_port(), free_port()])
                ids = [dd.link("c", {1: 0, 2: 1}, rank_table) for dd in (x, y)]
                for dd, comm_id in zip((x, y), ids):
                    wait_until(lambda: dd.query_register_mem_status(comm_id)
                               == RegisterMemStatus.OK, 30, "comm OK", 0.005)
                x.unlink(ids[0])
                y.unlink(ids[1])
                wait_until(lambda: not x.engine.peers() and not y.engine.peers(), 10,
                           "links gone")

            cycle()                                       # warm-up: lazily made workers
            threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
            for _ in range(20):
                cycle()
            wait_until(lambda: threading.active_count() <= threads, 10, "threads back")
            assert len(os.listdir("/proc/self/fd")) <= fds
            assert x.engine.address is None and y.engine.address is None
    finally:
        x.finalize()
        y.finalize()


def _port(dd):
    return int(dd.listen_address.rsplit(":", 1)[1])


@pytest.mark.parametrize("dialer", [1, 2], ids=["prompt-linked-first", "decoder-linked-first"])
def test_link_reuses_a_live_link_that_link_clusters_made(dialer):
    # Each cluster's member address is where it already listens; one of them
    # linked to the other by link_clusters before the rank-table flow.
    x = start(LLMRole.PROMPT, 1, listen="127.0.0.1:0", link_timeout=3000)
    y = start(LLMRole.DECODER, 2, listen="127.0.0.1:0", link_timeout=3000)
    try:
        with watchdog(60):
            first, other = (x, y) if dialer == 1 else (y, x)
            ret, _ = first.link_clusters([cluster_info(other.cluster_id, "127.0.0.1",
                                                       _port(other))])
            assert ret == LLMStatusCode.LLM_SUCCESS
            made = first.engine.find_peer(other.cluster_id)
            rank_table = table("127.0.0.1", [_port(x), _port(y)])
            ids = [dd.link("again", {1: 0, 2: 1}, rank_table) for dd in (x, y)]
            # At once: no dial, no wait for a deadline, no second link.
            assert [dd.query_register_mem_status(c) for dd, c in zip((x, y), ids)] == \
                [RegisterMemStatus.OK] * 2
            assert len(x.engine.peers()) == len(y.engine.peers()) == 1
            x.unlink(ids[0])
            y.unlink(ids[1])
            # The comm used the link; it leaves it to link_clusters' caller.
            assert first.engine.find_peer(other.cluster_id) is made
            assert first.check_link_status(other.cluster_id).name == "LINKED"
    finally:
        x.finalize()
        y.finalize()


def test_a_link_made_by_link_clusters_while_the_comm_comes_up_is_used():
    ports = [free_port(), free_port()]
    rank_table = table("127.0.0.1", ports)
    x = start(LLMRole.PROMPT, 1, link_timeout=5000)
    y = start(LLMRole.DECODER, 2, listen="127.0.0.1:0", link_timeout=5000)
    try:
        with watchdog(60):
            comm_x = x.link("c", {1: 0, 2: 1}, rank_table)     # y is not at its member address
            ret, _ = x.link_clusters([cluster_info(2, "127.0.0.1", _port(y))])
            assert ret == LLMStatusCode.LLM_SUCCESS
            made = x.engine.find_peer(2)
            comm_y = y.link("c", {1: 0, 2: 1}, rank_table)     # y takes x's link at once
            assert y.query_register_mem_status(comm_y) == RegisterMemStatus.OK
            # x's comm dials y's member address: already linked, so it uses that link.
            wait_until(lambda: x.query_register_mem_status(comm_x) != RegisterMemStatus.PREPARING,
                       30, "x's comm leaving PREPARING", 0.01)
            assert x.query_register_mem_status(comm_x) == RegisterMemStatus.OK
            assert x.engine.peers() == [made]
            x.unlink(comm_x)
            y.unlink(comm_y)
            assert x.check_link_status(2).name == "LINKED"
    finally:
        x.finalize()
        y.finalize()

def test_a_rank_table_listener_is_published_for_links_by_cluster_id(etcd):
    ports = [free_port(), free_port()]
    rank_table = table("127.0.0.1", ports)
    x = start(LLMRole.PROMPT, 1, metadata_server=etcd.url)         # listens nowhere
    y = start(LLMRole.DECODER, 2, metadata_server=etcd.url)
    z = start(LLMRole.DECODER, 3, metadata_server=etcd.url)
    try:
        with watchdog(60):
            ids = [dd.link("c", {1: 0, 2: 1}, rank_table) for dd in (x, y)]
            for dd, comm_id in zip((x, y), ids):
                wait_until(lambda: dd.query_register_mem_status(comm_id) == RegisterMemStatus.OK,
                           30, "comm OK", 0.01)
            # Cluster 3 knows neither address: it finds cluster 1's member
            # address through etcd.
            info = LLMClusterInfo()
            info.remote_cluster_id = 1
            ret, rets = z.link_clusters([info])
            assert rets == [LLMStatusCode.LLM_SUCCESS], rets
            assert z.engine.find_peer(1).name == x.engine.name
            z.unlink_clusters([info])
            x.unlink(ids[0])
            ret, rets = z.link_clusters([info], timeout=500)
            assert rets != [LLMStatusCode.LLM_SUCCESS], "still published after unlink"
            y.unlink(ids[1])
    finally:
        for dd in (x, y, z):
            dd.finalize()


def test_switch_role_keeps_the_listener_of_a_comm_still_linking():
    ports = [free_port(), free_port()]
    rank_table = table("127.0.0.1", ports)
    x = start(LLMRole.PROMPT, 1, link_timeout=LINK_TIMEOUT_MS)
    y = start(LLMRole.DECODER, 2, link_timeout=LINK_TIMEOUT_MS)
    try:
        with watchdog(60):
            comm_x = x.link("c", {1: 0, 2: 1}, rank_table)
            # x's comm is PREPARING (y has not called link): its address must stay.
            with pytest.raises(LLMException) as err:
                x.switch_role(LLMRole.DECODER)
            assert err.value.status_code == LLMStatusCode.LLM_EXIST_LINK
            assert x.listen_address == f"127.0.0.1:{ports[0]}"
            comm_y = y.link("c", {1: 0, 2: 1}, rank_table)
            for dd, comm_id in ((x, comm_x), (y, comm_y)):
                wait_until(lambda: dd.query_register_mem_status(comm_id) == RegisterMemStatus.OK,
                           30, "comm OK", 0.01)
            x.unlink(comm_x)
            y.unlink(comm_y)
            wait_until(lambda: not x.engine.peers(), 10, "links gone")
            x.switch_role(LLMRole.DECODER)
            assert x.listen_address is None
    finally:
        x.finalize()
        y.finalize()
