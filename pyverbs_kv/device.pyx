"""Devices: listing, opening, and querying device, port and GID table."""
import ipaddress
import socket
from collections import namedtuple

from libc.errno cimport errno
from libc.string cimport memset
from pyverbs_kv.base import VerbsError, fork_init
from pyverbs_kv.base cimport PyverbsObject
from pyverbs_kv.libibverbs cimport *
from pyverbs_kv.libibverbs_enums cimport *

GIDEntry = namedtuple("GIDEntry", "index gid gid_bytes type ipv4_mapped ipv4 netdev")
GIDEntry.__doc__ = ("One populated GID table entry. ``type`` is 'IB', 'RoCE v1' or "
                    "'RoCE v2'; ``ipv4`` is the IPv4 address of a mapped GID, else None.")

_GID_TYPE_NAMES = {IBV_GID_TYPE_IB: "IB", IBV_GID_TYPE_ROCE_V1: "RoCE v1",
                   IBV_GID_TYPE_ROCE_V2: "RoCE v2"}

MTU_BYTES = {IBV_MTU_256: 256, IBV_MTU_512: 512, IBV_MTU_1024: 1024,
             IBV_MTU_2048: 2048, IBV_MTU_4096: 4096}


def get_device_list():
    """Names of the RDMA devices present (empty when there are none)."""
    fork_init()
    cdef int num = 0
    cdef ibv_device **devs = ibv_get_device_list(&num)
    if devs == NULL:
        # ENOSYS: the kernel has no uverbs support at all; report no devices.
        return []
    try:
        return [ibv_get_device_name(devs[i]).decode() for i in range(num)]
    finally:
        ibv_free_device_list(devs)


def gid_to_str(gid_bytes):
    """The conventional IPv6 text form of a 16-byte GID (``::ffff:a.b.c.d``
    for an IPv4-mapped one)."""
    addr = ipaddress.IPv6Address(bytes(gid_bytes))
    if addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


def gid_from_str(gid):
    """16 raw bytes from a GID given as text (IPv6 form) or bytes."""
    if isinstance(gid, (bytes, bytearray)):
        if len(gid) != 16:
            raise ValueError(f"a GID is 16 bytes, got {len(gid)}")
        return bytes(gid)
    return ipaddress.IPv6Address(gid).packed


cdef class Context(PyverbsObject):
    """An opened RDMA device. ``Context()`` opens the first device."""

    def __init__(self, name=None):
        fork_init()
        cdef int num = 0
        cdef ibv_device **devs = ibv_get_device_list(&num)
        if devs == NULL or num == 0:
            if devs != NULL:
                ibv_free_device_list(devs)
            raise VerbsError("ibv_get_device_list", 0,
                             "no RDMA device found (is a NIC or rdma_rxe configured?)")
        names = []
        cdef ibv_device *chosen = NULL
        try:
            for i in range(num):
                dev_name = ibv_get_device_name(devs[i]).decode()
                names.append(dev_name)
                if chosen == NULL and (name is None or dev_name == name):
                    chosen = devs[i]
                    self.name = dev_name
            if chosen == NULL:
                raise VerbsError("ibv_open_device", 0,
                                 f"device {name!r} not found; present: {names}")
            with nogil:
                self.ctx = ibv_open_device(chosen)
            if self.ctx == NULL:
                raise VerbsError("ibv_open_device", errno, f"device {self.name}")
        finally:
            ibv_free_device_list(devs)

    def close(self):
        if self.ctx == NULL:
            return
        self.close_children()
        if self.borrowed:
            self.ctx = NULL
            self.owner = None
            return
        rc = ibv_close_device(self.ctx)
        self.ctx = NULL
        if rc != 0:
            raise VerbsError("ibv_close_device", errno, self.name)

    def __dealloc__(self):
        if self.ctx != NULL and not self.borrowed:
            ibv_close_device(self.ctx)
            self.ctx = NULL

    cdef check_open(self):
        if self.ctx == NULL:
            raise VerbsError("Context", 0, "the context is closed")

    def query_device(self):
        """Device attributes as a dict."""
        self.check_open()
        cdef ibv_device_attr attr
        memset(&attr, 0, sizeof(attr))
        rc = ibv_query_device(self.ctx, &attr)
        if rc != 0:
            raise VerbsError("ibv_query_device", rc, self.name)
        return dict(fw_ver=attr.fw_ver.decode(errors="replace"), node_guid=attr.node_guid,
                    max_mr_size=attr.max_mr_size, vendor_id=attr.vendor_id,
                    vendor_part_id=attr.vendor_part_id, max_qp=attr.max_qp,
                    max_qp_wr=attr.max_qp_wr, max_sge=attr.max_sge, max_cq=attr.max_cq,
                    max_cqe=attr.max_cqe, max_mr=attr.max_mr, max_pd=attr.max_pd,
                    max_qp_rd_atom=attr.max_qp_rd_atom,
                    max_qp_init_rd_atom=attr.max_qp_init_rd_atom,
                    phys_port_cnt=attr.phys_port_cnt)

    def query_port(self, int port_num=1):
        """Port attributes as a dict; MTUs are ibv_mtu values (see MTU_BYTES)."""
        self.check_open()
        cdef ibv_port_attr attr
        memset(&attr, 0, sizeof(attr))
        rc = ibv_query_port(self.ctx, port_num, &attr)
        if rc != 0:
            raise VerbsError("ibv_query_port", rc, f"{self.name} port {port_num}")
        return dict(state=attr.state, state_str=ibv_port_state_str(attr.state).decode(),
                    max_mtu=attr.max_mtu, active_mtu=attr.active_mtu,
                    gid_tbl_len=attr.gid_tbl_len, max_msg_sz=attr.max_msg_sz, lid=attr.lid,
                    link_layer={IBV_LINK_LAYER_INFINIBAND: "InfiniBand",
                                IBV_LINK_LAYER_ETHERNET: "Ethernet"}.get(attr.link_layer,
                                                                         "unspecified"))

    def query_gid(self, int port_num, int index):
        """The GID at ``index`` in IPv6 text form."""
        self.check_open()
        cdef ibv_gid gid
        rc = ibv_query_gid(self.ctx, port_num, index, &gid)
        if rc != 0:
            raise VerbsError("ibv_query_gid", errno,
                             f"{self.name} port {port_num} index {index}")
        return gid_to_str(bytes(gid.raw[:16]))

    def gid_table(self, int port_num=1):
        """The populated GID entries of a port, as GIDEntry tuples."""
        self.check_open()
        cdef ibv_gid_entry entry
        entries = []
        for index in range(self.query_port(port_num)["gid_tbl_len"]):
            rc = ibv_query_gid_ex(self.ctx, port_num, index, &entry, 0)
            if rc != 0:
                continue            # an empty slot (ENODATA) or one being updated
            raw = bytes(entry.gid.raw[:16])
            if raw == bytes(16):
                continue
            addr = ipaddress.IPv6Address(raw)
            try:
                netdev = socket.if_indextoname(entry.ndev_ifindex) if entry.ndev_ifindex else None
            except OSError:
                netdev = None
            entries.append(GIDEntry(index, gid_to_str(raw), raw,
                                    _GID_TYPE_NAMES.get(entry.gid_type, str(entry.gid_type)),
                                    addr.ipv4_mapped is not None,
                                    str(addr.ipv4_mapped) if addr.ipv4_mapped else None,
                                    netdev))
        return entries

    def pick_gid(self, int port_num=1, netdev=None):
        """Index of the GID to use on RoCE: RoCE v2 and IPv4-mapped first, then
        any RoCE v2, then RoCE v1 IPv4-mapped; on InfiniBand index 0.
        ``netdev`` restricts the choice to one network interface."""
        table = self.gid_table(port_num)
        if netdev is not None:
            table = [e for e in table if e.netdev == netdev]
        if self.query_port(port_num)["link_layer"] == "InfiniBand":
            for entry in table:
                if entry.index == 0:
                    return 0
        for wanted in (lambda e: e.type == "RoCE v2" and e.ipv4_mapped,
                       lambda e: e.type == "RoCE v2",
                       lambda e: e.ipv4_mapped):
            for entry in table:
                if wanted(entry):
                    return entry.index
        raise VerbsError("pick_gid", 0,
                         f"{self.name} port {port_num} has no usable GID"
                         + (f" on netdev {netdev}" if netdev else "")
                         + f"; table: {[(e.index, e.gid, e.type, e.netdev) for e in table]}")

