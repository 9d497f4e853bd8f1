"""pyverbs_kv behaviour that needs no RDMA device."""
import numpy as np
import pytest

import pyverbs_kv as pv
from pyverbs_kv import enums


def test_enums_are_importable_from_python():
    from pyverbs_kv.enums import IBV_WR_RDMA_WRITE, IBV_WC_REM_ACCESS_ERR, RDMA_PS_TCP
    assert int(IBV_WR_RDMA_WRITE) == 0
    assert enums.ibv_wc_status(IBV_WC_REM_ACCESS_ERR).name == "IBV_WC_REM_ACCESS_ERR"
    assert int(RDMA_PS_TCP) == 0x0106


def test_block_descriptors_compute_base_plus_id_times_stride():
    la, ra, ln = pv.block_descriptors(0x1000, 64, [3, 0, 7], 0x9000, 128, [1, 2, 5], 64)
    assert la.tolist() == [0x1000 + 192, 0x1000, 0x1000 + 448]
    assert ra.tolist() == [0x9000 + 128, 0x9000 + 256, 0x9000 + 640]
    assert ln.tolist() == [64, 64, 64]
    assert la.dtype == np.uint64


def test_block_descriptors_reject_bad_ids():
    with pytest.raises(ValueError, match="negative block id at position 1"):
        pv.block_descriptors(0, 64, [0, -1], 0, 64, [0, 1], 64)
    with pytest.raises(ValueError, match="3 local ids but 2 remote ids"):
        pv.block_descriptors(0, 64, [0, 1, 2], 0, 64, [0, 1], 64)


def test_errors_carry_errno_and_call():
    err = pv.VerbsError("ibv_reg_mr", 12, "addr=0x0")
    assert err.errno == 12 and err.call == "ibv_reg_mr"
    assert "ibv_reg_mr failed: [errno 12]" in str(err)
    assert isinstance(pv.VerbsTimeout("poll"), pv.VerbsError)


def test_memlock_advice_names_the_limit_and_the_fix():
    text = pv.memlock_advice(1 << 20)
    limit = pv.memlock_limit()
    if limit is None:
        assert "unlimited" in text
    else:
        assert str(limit) in text and "ulimit -l unlimited" in text


@pytest.mark.skipif(bool(pv.get_device_list()), reason="this machine has an RDMA device")
def test_no_device_is_reported_clearly():
    assert pv.get_device_list() == []
    with pytest.raises(pv.VerbsError, match="no RDMA device found"):
        pv.Context()


def test_wc_dtype_matches_c_layout():
    assert pv.WC_DTYPE.names == ("wr_id", "status", "opcode", "byte_len", "vendor_err",
                                 "imm_data", "qp_num", "wc_flags")
    assert pv.WC_DTYPE.itemsize == 40
