"""LLMDataDist: the LLM-DataDist-style entry point (roles, clusters, links)
over the TransferEngine, with the CacheManager as ``cache_manager``."""
import logging
import threading
import time

from kvcache.bufpool import BufferPool, BufPoolConfig
from kvcache.cache_manager import CacheManager
from kvcache.engine import TRANSPORTS, LinkState, TransferEngine, parse_address
from kvcache.engine.address import format_address
from kvcache.rdma_support import rdma_status
from kvcache import checks
from kvcache.checks import public
from kvcache.status import LLMException, LLMStatusCode
from kvcache.values import LLMClusterInfo, LLMRole

log = logging.getLogger(__name__)

MAX_CLUSTERS_PER_CALL = 16
TRANSPORT_CHOICES = ("auto", "tcp", "shm", "rdma")

# Option keys of LLMConfig.generate_options().
OPT_DEVICE_ID = "llm.DeviceId"
OPT_LISTEN = "llm.ListenIpInfo"
OPT_BUF_POOL = "llm.BufPoolCfg"
OPT_SYNC_TIMEOUT = "llm.SyncKvCacheWaitTime"
OPT_TRANSPORT = "llm.Transport"
OPT_LINK_TIMEOUT = "llm.LinkTimeout"
OPT_ENABLE_SWITCH_ROLE = "llm.EnableSwitchRole"
OPT_AUTH_KEY = "llm.AuthKey"
OPT_TLS_CERT = "llm.TlsCert"
OPT_TLS_KEY = "llm.TlsKey"
OPT_TLS_CA = "llm.TlsCa"


class LLMConfig:
    """Options for LLMDataDist.init. Attributes:
    device_id (int, 0), listen_ip_info ("ip:port" this process accepts links
    on; whoever listens is the server of its links), buf_pool_cfg (JSON, see kvcache.bufpool),
    sync_kv_timeout (ms per transfer, default 1000), transport
    (auto|tcp|shm|rdma), link_timeout (ms, default 3000), enable_switch_role,
    auth_key (the shared secret every link must prove, a string of at least
    16 bytes; "" : KVCACHE_AUTH_KEY / KVCACHE_AUTH_KEY_FILE, or none),
    tls_cert, tls_key, tls_ca (PEM file paths for TLS on the control channel
    and the TCP data lanes; "": KVCACHE_TLS_CERT / KVCACHE_TLS_KEY /
    KVCACHE_TLS_CA, or no TLS; with a CA the other end must present a
    certificate it signed)."""

    def __init__(self):
        self.device_id = 0
        self.listen_ip_info = ""
        self.buf_pool_cfg = ""
        self.sync_kv_timeout = 1000
        self.transport = "auto"
        self.link_timeout = 3000
        self.enable_switch_role = False
        self.auth_key = ""
        self.tls_cert = self.tls_key = self.tls_ca = ""

    def generate_options(self):
        return {OPT_DEVICE_ID: str(self.device_id), OPT_LISTEN: str(self.listen_ip_info),
                OPT_BUF_POOL: str(self.buf_pool_cfg), OPT_SYNC_TIMEOUT: str(self.sync_kv_timeout),
                OPT_TRANSPORT: str(self.transport), OPT_LINK_TIMEOUT: str(self.link_timeout),
                OPT_ENABLE_SWITCH_ROLE: "1" if self.enable_switch_role else "0",
                OPT_AUTH_KEY: str(self.auth_key), OPT_TLS_CERT: str(self.tls_cert),
                OPT_TLS_KEY: str(self.tls_key), OPT_TLS_CA: str(self.tls_ca)}


def _int_option(options, key, default):
    text = options.get(key, "")
    if text in ("", None):
        return default
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"option {key}={text!r} is not an integer") from None
    if value <= 0 and key != OPT_DEVICE_ID:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"option {key} must be positive")
    return value


def choose_transport(requested):
    """(transport name, why). 'auto' prefers RDMA, then same-host shared
    memory, then TCP, among those this build provides."""
    if requested not in TRANSPORT_CHOICES:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"transport must be one of {TRANSPORT_CHOICES}, got {requested!r}")
    if requested == "rdma" and not rdma_status().available:
        raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                           f"transport 'rdma' unavailable: {rdma_status().reason}")
    if requested != "auto":
        if requested not in TRANSPORTS:
            raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                               f"transport {requested!r} is not available in this build "
                               f"(have {sorted(TRANSPORTS)})")
        return requested, "requested"
    if "rdma" in TRANSPORTS and rdma_status().available:
        return "rdma", rdma_status().reason
    reasons = [f"rdma off: {rdma_status().reason}" if "rdma" in TRANSPORTS
               else "rdma transport not built"]
    if "shm" in TRANSPORTS:
        return "shm", "; ".join(reasons)
    return "tcp", "; ".join(reasons + ["shm transport not built"])


class LLMDataDist:
    @public
    def __init__(self, role, cluster_id):
        self.role = LLMRole(role)
        self.cluster_id = int(cluster_id)
        self._engine = None
        self._pool = None
        self._cache_manager = None
        self._lock = threading.Lock()
        self.transport = None
        self.transport_reason = ""

    @public
    def init(self, options):
        """Start: buffer pool, engine, listener (from the options of
        LLMConfig.generate_options())."""
        if self._engine is not None:
            raise LLMException(LLMStatusCode.LLM_REPEAT_REQUEST, "already initialised")
        options = dict(options)
        listen = options.get(OPT_LISTEN, "")
        if listen:
            parse_address(listen)
        self._switchable = options.get(OPT_ENABLE_SWITCH_ROLE, "0") == "1"
        self.sync_timeout_ms = _int_option(options, OPT_SYNC_TIMEOUT, 1000)
        self.link_timeout_ms = _int_option(options, OPT_LINK_TIMEOUT, 3000)
        self.device_id = _int_option(options, OPT_DEVICE_ID, 0)
        self.transport, self.transport_reason = choose_transport(
            options.get(OPT_TRANSPORT, "auto") or "auto")
        log.info("cluster %d: transport %s (%s)", self.cluster_id, self.transport,
                 self.transport_reason)
        pool = BufferPool(BufPoolConfig.parse(options.get(OPT_BUF_POOL, "")))
        self._engine = None
        try:
            self._engine = TransferEngine(f"cluster-{self.cluster_id}", listen=listen or None,
                                          cluster_id=self.cluster_id, role=self.role.value,
                                          transport=self.transport,
                                          timeout_ms=self.link_timeout_ms,
                                          device_id=self.device_id,
                                          auth_key=options.get(OPT_AUTH_KEY) or None,
                                          tls_cert=options.get(OPT_TLS_CERT) or None,
                                          tls_key=options.get(OPT_TLS_KEY) or None,
                                          tls_ca=options.get(OPT_TLS_CA) or None)
            self._cache_manager = CacheManager(self._engine, pool, self.cluster_id,
                                               self.sync_timeout_ms)
        except BaseException:
            if self._engine is not None:
                self._engine.close()
            pool.close()
            self._engine = self._cache_manager = None
            raise
        self._pool = pool

    def _started(self):
        if self._engine is None:
            raise LLMException(LLMStatusCode.LLM_ENGINE_FINALIZED,
                               "LLMDataDist is not initialised (or finalized)")
        return self._engine

    @property
    def cache_manager(self):
        self._started()
        return self._cache_manager

    @property
    def engine(self):
        """The TransferEngine underneath (one-sided API)."""
        return self._started()

    @property
    def listen_address(self):
        return self._started().address

    @public
    def link_clusters(self, clusters, timeout=3000):
        """Link to each cluster's first remote address. Returns (status,
        [status per cluster]); LLM_SUCCESS only if all linked. ``timeout``:
        ms per link, 1..2**31-1."""
        engine = self._started()
        timeout = checks.timeout_ms(timeout, "timeout")
        clusters = list(clusters)
        if len(clusters) > MAX_CLUSTERS_PER_CALL:
            raise LLMException(LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT,
                               f"{len(clusters)} clusters in one call; at most "
                               f"{MAX_CLUSTERS_PER_CALL}")
        results = []
        for info in clusters:
            results.append(self._link_one(engine, info, timeout))
        ok = all(r == LLMStatusCode.LLM_SUCCESS for r in results)
        return (LLMStatusCode.LLM_SUCCESS if ok else LLMStatusCode.LLM_LINK_FAILED), results

    def _link_one(self, engine, info, timeout):
        if not isinstance(info, LLMClusterInfo) or not info.remote_ip_info:
            return LLMStatusCode.LLM_PARAM_INVALID
        existing = engine.find_peer(info.remote_cluster_id)
        if existing is not None and existing.state == LinkState.LINKED:
            return LLMStatusCode.LLM_ALREADY_LINK
        host, port = info.remote_ip_info[0]
        try:
            peer = engine.connect(format_address(host, port), timeout_ms=timeout)
        except LLMException as exc:
            log.warning("cluster %d: link to cluster %d at %s:%d failed: %s", self.cluster_id,
                        info.remote_cluster_id, host, port, exc)
            return exc.status_code
        if peer.cluster_id != info.remote_cluster_id:
            engine.disconnect(peer, force=True)
            log.warning("cluster %d: %s:%d is cluster %d, not %d", self.cluster_id, host, port,
                        peer.cluster_id, info.remote_cluster_id)
            return LLMStatusCode.LLM_LINK_FAILED
        return LLMStatusCode.LLM_SUCCESS

    @public
    def unlink_clusters(self, clusters, timeout=3000, force=False):
        """Unlink each cluster. Returns (status, [status per cluster]);
        LLM_LINK_BUSY for a link with transfers in flight unless ``force``."""
        engine = self._started()
        timeout = checks.timeout_ms(timeout, "timeout")
        results = []
        for info in clusters:
            if not isinstance(info, LLMClusterInfo):
                results.append(LLMStatusCode.LLM_PARAM_INVALID)
                continue
            peer = engine.find_peer(info.remote_cluster_id)
            if peer is None:
                results.append(LLMStatusCode.LLM_NOT_YET_LINK)
                continue
            try:
                engine.disconnect(peer, force=force, timeout_ms=timeout)
                results.append(LLMStatusCode.LLM_SUCCESS)
            except LLMException as exc:
                results.append(exc.status_code)
        ok = all(r == LLMStatusCode.LLM_SUCCESS for r in results)
        return (LLMStatusCode.LLM_SUCCESS if ok else LLMStatusCode.LLM_UNLINK_FAILED), results

    @public
    def check_link_status(self, remote_cluster_id):
        """The LinkState of the link to a cluster: FAILED when the last one
        failed (until the next link), IDLE when there is none."""
        engine = self._started()
        peer = engine.find_peer(remote_cluster_id)
        if peer is not None:
            return peer.state
        return LinkState.FAILED if engine.links.failure(remote_cluster_id) else LinkState.IDLE

    @public
    def switch_role(self, role, switch_options=None):
        """Become ``role``. LLM_EXIST_LINK while links remain. With
        switch_options["llm.ListenIpInfo"] the cluster listens there from now
        on; becoming a DECODER without it stops listening."""
        engine = self._started()
        if not self._switchable:
            raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                               "switch_role needs LLMConfig.enable_switch_role = True")
        role = LLMRole(role)
        # A peer's unlink returns once we answered its BYE; our side of that
        # link closes a moment later, when the connection drops.
        deadline = time.monotonic() + engine.timeout_ms / 1000
        for peer in engine.peers():
            peer.link.wait_leaves(LinkState.UNLINKING, max(0.0, deadline - time.monotonic()))
        live = [p for p in engine.peers() if p.state != LinkState.IDLE]
        if live:
            raise LLMException(LLMStatusCode.LLM_EXIST_LINK,
                               f"unlink first: {[p.name for p in live]}")
        listen = (switch_options or {}).get(OPT_LISTEN, "")
        if listen:
            engine.stop_listening()
            engine.start_listening(listen)
        elif role == LLMRole.DECODER:
            engine.stop_listening()
        engine.role = role.value
        self.role = role

    @public
    def finalize(self):
        """Unlink everything, free caches and the pool. Idempotent."""
        if self._engine is None:
            return
        engine, self._engine = self._engine, None
        self._cache_manager.close()
        engine.close()
        self._pool.close()
