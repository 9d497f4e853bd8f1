"""Descriptor building and merging, region checks, protocol framing and the
link state machine."""
import json
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcache import LLMException, LLMStatusCode
from kvcache.descriptors import RegionTable, block_descriptors, merge_runs
from kvcache.engine.link import Link, LinkState
from kvcache.transports.rdma import _split_long
from pyverbs_kv import pieces
from kvcache.transports.tcp.protocol import (FRAME, MAX_HEADER_BYTES, VERSION, MsgType,
                                             ProtocolError, check_descriptor_payload,
                                             decode_frame, decode_header, encode)


def test_block_descriptors_cover_every_tensor_and_block():
    local, remote, lengths = block_descriptors([1000, 5000], 10, [0, 3], [20000, 30000], 10,
                                               [7, 1])
    assert local.tolist() == [1000, 1030, 5000, 5030]
    assert remote.tolist() == [20070, 20010, 30070, 30010]
    assert lengths.tolist() == [10] * 4


def test_merge_runs_merges_only_runs_contiguous_on_both_sides():
    local = np.array([0, 10, 20, 40, 50], dtype=np.uint64)
    remote = np.array([100, 110, 200, 210, 220], dtype=np.uint64)
    lengths = np.full(5, 10, dtype=np.uint64)
    l2, r2, n2 = merge_runs(local, remote, lengths)
    assert l2.tolist() == [0, 20, 40] and r2.tolist() == [100, 200, 210]
    assert n2.tolist() == [20, 10, 20]
    # A group (region ids) that differs splits a run.
    groups = np.array([1, 1, 1, 2, 3], dtype=np.uint64)
    l3, r3, n3, g3 = merge_runs(local, remote, lengths, groups)
    assert n3.tolist() == [20, 10, 10, 10] and g3.tolist() == [1, 1, 2, 3]


@given(st.lists(st.integers(0, 50), min_size=1, max_size=200))
def test_merged_descriptors_copy_the_same_bytes(ids):
    block = 4
    local, remote, lengths = block_descriptors([0], block, np.arange(len(ids)), [0], block, ids)
    src = np.arange(len(ids) * block, dtype=np.uint8)
    a = np.zeros(51 * block, dtype=np.uint8)
    b = np.zeros(51 * block, dtype=np.uint8)
    for arr, (lo, r, n) in ((a, (local, remote, lengths)), (b, merge_runs(local, remote, lengths))):
        for li, ri, ni in zip(lo.tolist(), r.tolist(), n.tolist()):
            arr[ri:ri + ni] = src[li:li + ni]
    np.testing.assert_array_equal(a, b)


def test_region_table_checks_bounds():
    table = RegionTable([(1, 1000, 100), (2, 5000, 10)])
    assert table.check([1000, 1090, 5000], [10, 10, 10], "x").tolist() == [1, 1, 2]
    with pytest.raises(LLMException, match="x piece 1 .* outside registered memory"):
        table.check([1000, 1095], [10, 10], "x")
    with pytest.raises(LLMException, match="overlap"):
        RegionTable([(1, 0, 100), (2, 50, 100)])
    ids, misses = table.locate([999, 5010], [1, 1])
    assert (ids == np.iinfo(np.uint64).max).all() and misses == 2


def _oracle_region(regions, addr, length):
    """Region id wholly holding [addr, addr + length), by brute force."""
    for region_id, start, size in regions:
        if start <= addr and addr + length <= start + size:
            return region_id
    return None


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), min_size=0, max_size=8),
       st.lists(st.tuples(st.integers(0, 400), st.integers(1, 60)), min_size=0, max_size=300))
def test_region_lookup_matches_brute_force(layout, queries):
    regions, cursor = [], 0
    for i, (gap, size) in enumerate(layout):     # disjoint, possibly adjacent regions
        cursor += gap
        regions.append((i + 7, cursor, size))
        cursor += size
    table = RegionTable(regions)
    addrs = [a for a, _ in queries]
    lengths = [n for _, n in queries]
    ids, misses = table.locate(addrs, lengths)
    expect = [_oracle_region(regions, a, n) for a, n in queries]
    assert misses == sum(e is None for e in expect)
    assert [None if i == np.iinfo(np.uint64).max else i for i in ids.tolist()] == expect


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), min_size=0, max_size=6),
       st.lists(st.tuples(st.integers(0, 300), st.integers(1, 50), st.integers(0, 200)),
                min_size=0, max_size=100),
       st.booleans())
def test_copy_mapped_copies_exactly_the_mapped_pieces(layout, queries, to_mapping):
    """The shm kernel against brute force: regions of a 'peer' address
    space [0, 400) are mapped at an offset in ``view``; each piece is copied
    through its region's shift or reported as missed, and nothing else moves."""
    regions, cursor = [], 0
    for gap, size in layout:
        cursor += gap
        regions.append((cursor, size))
        cursor += size
    view = np.random.default_rng(1).integers(1, 255, 1024, dtype=np.uint8)
    local = np.random.default_rng(2).integers(1, 255, 512, dtype=np.uint8)
    base, offset = view.ctypes.data, 500             # peer address a -> view[a + offset]
    starts = np.array([a for a, _ in regions], dtype=np.uint64)
    ends = np.array([a + n for a, n in regions], dtype=np.uint64)
    shifts = np.full(len(regions), base + offset, dtype=np.uint64)
    # Distinct local slots so copies never overlap on our side.
    local_at = [64 * (i % 8) for i in range(len(queries))][:8]
    queries = queries[:len(local_at)]
    remote = np.array([a for a, _, _ in queries], dtype=np.uint64)
    lengths = np.array([min(n, 64) for _, n, _ in queries], dtype=np.uint64)
    locals_ = np.array([local.ctypes.data + s for s in local_at], dtype=np.uint64)
    view_before, local_before = view.copy(), local.copy()
    missed = pieces.copy_mapped(to_mapping, locals_, remote, lengths, starts, ends, shifts)
    view_expect, local_expect = view_before.copy(), local_before.copy()
    expect_missed = []
    for i, (a, _, _) in enumerate(queries):
        n = int(lengths[i])
        if not any(s <= a and a + n <= s + size for s, size in regions):
            expect_missed.append(i)
            continue
        there, here = a + offset, local_at[i]
        if to_mapping:
            view_expect[there:there + n] = local_expect[here:here + n]
        else:
            local_expect[here:here + n] = view_expect[there:there + n]
    assert (missed is None) == (not expect_missed)
    if missed is not None:
        assert missed.tolist() == expect_missed
    np.testing.assert_array_equal(view, view_expect)
    np.testing.assert_array_equal(local, local_expect)


def test_region_lookup_rejects_a_piece_that_wraps_the_address_space():
    table = RegionTable([(1, 0, 1 << 20)])
    ids, misses = table.locate([2**64 - 16], [32])
    assert misses == 1


def test_block_descriptors_reject_negative_ids_and_mismatched_counts():
    with pytest.raises(LLMException, match="non-negative") as err:
        block_descriptors([0], 8, [1, -1], [0], 8, [2, 3])
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(LLMException, match="2 source blocks but 1 destination"):
        block_descriptors([0], 8, [1, 2], [0], 8, [3])
    with pytest.raises(LLMException, match="1 source tensors but 2 destination"):
        block_descriptors([0], 8, [1], [0, 64], 8, [3])


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 2)),
                min_size=0, max_size=200))
def test_merge_runs_matches_a_python_merge(rows):
    local = np.array([r[0] * 4 for r in rows], dtype=np.uint64)
    remote = np.array([r[1] * 4 for r in rows], dtype=np.uint64)
    lengths = np.full(len(rows), 4, dtype=np.uint64)
    groups = np.array([r[2] for r in rows], dtype=np.uint64)
    expect = []
    for lo, r, g in zip(local.tolist(), remote.tolist(), groups.tolist()):
        if expect and expect[-1][0] + expect[-1][2] == lo and expect[-1][1] + expect[-1][2] == r \
                and expect[-1][3] == g:
            expect[-1][2] += 4
        else:
            expect.append([lo, r, 4, g])
    got = merge_runs(local, remote, lengths, groups)
    assert [list(t) for t in zip(*(a.tolist() for a in got))] == expect


def test_frames_round_trip_and_reject_bad_input():
    frame = encode(MsgType.CALL, 7, {"method": "m", "params": {}}, payload_len=0)
    msg_type, req_id, header_len, payload_len = decode_frame(frame[:FRAME.size])
    assert (msg_type, req_id, payload_len) == (MsgType.CALL, 7, 0)
    assert decode_header(msg_type, frame[FRAME.size:])["method"] == "m"
    with pytest.raises(ProtocolError, match="bad magic"):
        decode_frame(b"XXXX" + frame[4:FRAME.size])
    with pytest.raises(ProtocolError, match="version"):
        decode_frame(frame[:4] + b"\x00\x09" + frame[6:FRAME.size])
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode_frame(frame[:6] + b"\x00\x63" + frame[8:FRAME.size])
    big = FRAME.pack(b"KVC1", VERSION, 20, 1, MAX_HEADER_BYTES + 1, 0)
    with pytest.raises(ProtocolError, match="header length"):
        decode_frame(big)
    with pytest.raises(ProtocolError, match="'params' missing"):
        decode_header(MsgType.CALL, json.dumps({"method": "m"}).encode())
    with pytest.raises(ProtocolError, match="not JSON"):
        decode_header(MsgType.CALL, b"\xff{")
    with pytest.raises(ProtocolError, match="field 'count'"):
        decode_header(MsgType.WRITE, json.dumps({"count": True, "bytes": 1}).encode())
    with pytest.raises(ProtocolError, match="expected 48"):
        check_descriptor_payload({"count": 2, "bytes": 0}, 40, with_data=False)


@given(st.binary(min_size=FRAME.size, max_size=FRAME.size), st.binary(max_size=200))
def test_decoding_random_bytes_fails_only_with_protocol_error(frame, header):
    try:
        msg_type, _, _, _ = decode_frame(frame)
        decode_header(msg_type, header)
    except ProtocolError:
        pass


def test_link_moves_only_along_legal_transitions():
    link = Link("x")
    with pytest.raises(LLMException, match="illegal transition IDLE -> LINKED"):
        link.transition(LinkState.LINKED)
    link.transition(LinkState.CONNECTING)
    link.transition(LinkState.LINKED)
    link.begin_transfer()
    with pytest.raises(LLMException) as err:
        link.begin_unlink()
    assert err.value.status_code == LLMStatusCode.LLM_LINK_BUSY
    link.end_transfer()
    assert link.begin_unlink() is True
    assert link.state == LinkState.UNLINKING
    with pytest.raises(LLMException) as err:
        link.begin_transfer()
    assert err.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    link.transition(LinkState.IDLE)


def test_failed_link_refuses_transfers_and_can_relink():
    link = Link("y")
    link.transition(LinkState.CONNECTING)
    link.transition(LinkState.LINKED)
    link.fail("peer died")
    with pytest.raises(LLMException) as err:
        link.begin_transfer()
    assert err.value.status_code == LLMStatusCode.LLM_LINK_FAILED
    assert "peer died" in str(err.value)
    assert link.begin_unlink() is False             # nothing to tell a dead peer
    link.transition(LinkState.CONNECTING)
    link.transition(LinkState.LINKED)


def test_link_counts_concurrent_transfers():
    link = Link("z")
    link.transition(LinkState.CONNECTING)
    link.transition(LinkState.LINKED)

    def work():
        for _ in range(1000):
            link.begin_transfer()
            link.end_transfer()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert link.in_flight == 0


def test_long_pieces_are_cut_to_the_max_message_size():
    local = np.array([1000, 50_000], dtype=np.uint64)
    remote = np.array([9000, 90_000], dtype=np.uint64)
    lengths = np.array([25, 10], dtype=np.uint64)
    l2, r2, n2 = _split_long(local, remote, lengths, 10)
    assert l2.tolist() == [1000, 1010, 1020, 50_000]
    assert r2.tolist() == [9000, 9010, 9020, 90_000]
    assert n2.tolist() == [10, 10, 5, 10]


def test_recycled_descriptor_buffers_never_alias_live_arrays():
    # 10000 pieces (80 KB per array) come from the recycler; arrays still
    # referenced must keep their contents while others are freed and reused.
    base = np.zeros(1, dtype=np.uint64)
    live = []
    for round_ in range(30):
        local, _, _ = block_descriptors(base, 1, np.arange(10000) + round_, base, 1,
                                        np.arange(10000))
        live.append((round_, local))
        if round_ % 3 == 0:
            live.pop(0)
    for round_, local in live:
        np.testing.assert_array_equal(local, np.arange(10000) + round_)
