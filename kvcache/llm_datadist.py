"""LLMDataDist: the LLM-DataDist-style entry point (roles, clusters, links)
over the TransferEngine, with the CacheManager as ``cache_manager``."""
import json
import logging
import threading
import time

from kvcache.bufpool import BufferPool, BufPoolConfig
from kvcache.cache_manager import CacheManager
from kvcache.device.caches import DeviceConfig
from kvcache.engine import TRANSPORTS, LinkState, TransferEngine, discovery, parse_address
from kvcache.engine.address import format_address
from kvcache.rank_table import DEFAULT_BASE_PORT, RankTableLinks
# llm_datadist exports the layer-wise names beside LLMDataDist.
from kvcache.layerwise import CacheTask as CacheTask
from kvcache.layerwise import LayerSynchronizer as LayerSynchronizer
from kvcache.layerwise import TransferConfig as TransferConfig
from kvcache.layerwise import TransferWithCacheKeyConfig as TransferWithCacheKeyConfig
from kvcache.rdma_support import rdma_status
from kvcache import checks
from kvcache.checks import public
from kvcache.status import LLMException, LLMStatusCode
from kvcache.values import LLMClusterInfo, LLMRole

log = logging.getLogger(__name__)

MAX_CLUSTERS_PER_CALL = 16
TRANSPORT_CHOICES = ("auto", "tcp", "shm", "rdma")

# Option keys of LLMConfig.generate_options(): llm_datadist's spelling where
# it has the option; the "ours" spellings of earlier releases are still read.
OPT_LISTEN = "llm.listenIpInfo"
OPT_LISTEN_OURS = "llm.ListenIpInfo"
OPT_DEVICE_ID = "ge.exec.deviceId"
OPT_DEVICE_ID_OURS = "llm.DeviceId"
OPT_BUF_POOL = "llm.BufPoolCfg"
OPT_MEM_POOL = "llm.MemPoolConfig"
OPT_HOST_MEM_POOL = "llm.HostMemPoolConfig"
OPT_SYNC_TIMEOUT = "llm.SyncKvCacheWaitTime"
OPT_TRANSPORT = "llm.Transport"
OPT_LINK_TIMEOUT = "llm.LinkTimeout"
OPT_LINK_TOTAL_TIME = "llm.LinkTotalTime"
OPT_LINK_RETRY_COUNT = "llm.LinkRetryCount"
OPT_ENABLE_SWITCH_ROLE = "llm.EnableSwitchRole"
OPT_ENABLE_CACHE_MANAGER = "llm.EnableCacheManager"
OPT_REMOTE_CACHE_ACCESSIBLE = "llm.EnableRemoteCacheAccessible"
OPT_RDMA_TRAFFIC_CLASS = "llm.RdmaTrafficClass"
OPT_RDMA_SERVICE_LEVEL = "llm.RdmaServiceLevel"
OPT_AUTH_KEY = "llm.AuthKey"
OPT_METADATA_SERVER = "llm.MetadataServer"
OPT_RANK_TABLE_PORT = "llm.RankTablePort"
OPT_TLS_CERT = "llm.TlsCert"
OPT_TLS_KEY = "llm.TlsKey"
OPT_TLS_CA = "llm.TlsCa"
OPT_DEVICE_TYPE = "llm.DeviceType"
OPT_DEVICE_POOL = "llm.DeviceMemPoolSize"
OPT_DEVICE_CHUNK = "llm.DeviceChunkSize"

# llm_datadist options that mean nothing here, and why (logged once each).
NO_EFFECT = {
    "llm.LocalCommRes": "HCCL communication resources; links here are made by link_clusters",
    "llm.TransferBackend": "selects an Ascend engine; use LLMConfig.transport here",
    "llm.MemoryUtilization": "sizes an NPU graph memory pool; none exists here",
    "llm.HcomClusterConfig": "an HCCL setting",
    "llm.deployResPath": "an offline deployment setting",
    "llm.OutputMaxSize": "an offline inference setting",
    "llm.ClusterInfo": "an offline deployment setting",
    "llm.NnExecuteWaitTime": "an offline inference setting",
    "llm.ProcessRequestWaitTime": "an offline inference setting",
    "ge.session_device_id": "a device runtime setting (device_id is read from "
                            "ge.exec.deviceId)",
}
_KNOWN = {OPT_LISTEN, OPT_LISTEN_OURS, OPT_DEVICE_ID, OPT_DEVICE_ID_OURS, OPT_BUF_POOL,
          OPT_MEM_POOL, OPT_HOST_MEM_POOL, OPT_SYNC_TIMEOUT, OPT_TRANSPORT, OPT_LINK_TIMEOUT,
          OPT_LINK_TOTAL_TIME, OPT_LINK_RETRY_COUNT, OPT_ENABLE_SWITCH_ROLE,
          OPT_ENABLE_CACHE_MANAGER, OPT_REMOTE_CACHE_ACCESSIBLE, OPT_RDMA_TRAFFIC_CLASS,
          OPT_RDMA_SERVICE_LEVEL, OPT_AUTH_KEY, OPT_METADATA_SERVER, OPT_RANK_TABLE_PORT,
          OPT_TLS_CERT, OPT_TLS_KEY, OPT_TLS_CA, OPT_DEVICE_TYPE, OPT_DEVICE_POOL,
          OPT_DEVICE_CHUNK}
_told = set()
_told_lock = threading.Lock()


def _log_once(key, message):
    with _told_lock:
        if key in _told:
            return
        _told.add(key)
    log.warning(message)


class LLMConfig:
    """Options for LLMDataDist.init, as llm_datadist's LLMConfig; attribute
    -> option key of ``generate_options()``:

    device_id (int, 0; ge.exec.deviceId), listen_ip_info ("ip:port" this
    process accepts links on; llm.listenIpInfo), sync_kv_timeout (ms per
    transfer, default 1000), enable_switch_role (accepted; switch_role works
    without it, as llm_datadist's cache-manager mode), link_total_time (s,
    0: link_timeout per attempt) and link_retry_count (1..100 attempts per
    link), mem_pool_cfg / host_mem_pool_cfg (JSON {"memory_size": bytes}:
    the size of the buffer pool every allocate_cache takes from),
    enable_remote_cache_accessible (pull_cache by CacheKeyByIdAndIndex
    only, as llm_datadist), rdma_traffic_class (0..255) and
    rdma_service_level (0..15) of the RDMA transport's QPs,
    enable_cache_manager (always on here), local_comm_res, transfer_backend,
    mem_utilization, ge_options (accepted; no effect here, logged once).

    Ours: buf_pool_cfg (JSON, see kvcache.bufpool; wins over the pool sizes
    above), transport (auto|tcp|shm|rdma), link_timeout (ms per link
    attempt and control call, default 3000), auth_key (the shared secret
    every link must prove, a string of at least 16 bytes; "":
    KVCACHE_AUTH_KEY / KVCACHE_AUTH_KEY_FILE, or none), metadata_server
    ("" or "P2PHANDSHAKE": none; "etcd://host:port" or "host:port": a
    listening cluster publishes itself there under its cluster id, and
    link_clusters finds a cluster given without an address there, see
    kvcache.engine.discovery), rank_table_port (the base port of the
    rank-table flow: a member without ``device_port`` listens at its
    device_ip, port base + rank_id; default 26000), tls_cert, tls_key,
    tls_ca (PEM file paths for TLS on the control channel and the TCP data
    lanes; "": KVCACHE_TLS_CERT / KVCACHE_TLS_KEY / KVCACHE_TLS_CA, or no
    TLS; with a CA the other end must present a certificate it signed),
    device_type ('npu' or 'cuda': where Placement.DEVICE caches live; "":
    KVCACHE_DEVICE_TYPE, or none), device_mem_pool_size (bytes of device
    memory allocate_cache takes DEVICE caches from; None:
    KVCACHE_DEVICE_POOL_SIZE, default 256 MiB), device_chunk_size (bytes of
    each pinned staging slot device caches move through; None:
    KVCACHE_DEVICE_CHUNK_BYTES, default 4 MiB); see kvcache.device."""

    def __init__(self):
        self.device_id = 0
        self.listen_ip_info = ""
        self.buf_pool_cfg = ""
        self.mem_pool_cfg = ""
        self.host_mem_pool_cfg = ""
        self.sync_kv_timeout = 1000
        self.transport = "auto"
        self.link_timeout = 3000
        self.link_total_time = None
        self.link_retry_count = None
        self.enable_switch_role = False
        self.enable_cache_manager = None
        self.enable_remote_cache_accessible = None
        self.rdma_traffic_class = None
        self.rdma_service_level = None
        self.local_comm_res = None
        self.transfer_backend = None
        self.mem_utilization = None
        self.ge_options = {}
        self.auth_key = ""
        self.metadata_server = ""
        self.rank_table_port = DEFAULT_BASE_PORT
        self.tls_cert = self.tls_key = self.tls_ca = ""
        self.device_type = ""
        self.device_mem_pool_size = None
        self.device_chunk_size = None

    def generate_options(self):
        options = {str(k): str(v) for k, v in dict(self.ge_options).items()}
        options.update({OPT_DEVICE_ID: str(self.device_id), OPT_LISTEN: str(self.listen_ip_info),
                        OPT_BUF_POOL: str(self.buf_pool_cfg),
                        OPT_SYNC_TIMEOUT: str(self.sync_kv_timeout),
                        OPT_TRANSPORT: str(self.transport),
                        OPT_LINK_TIMEOUT: str(self.link_timeout),
                        OPT_ENABLE_SWITCH_ROLE: "1" if self.enable_switch_role else "0",
                        OPT_AUTH_KEY: str(self.auth_key),
                        OPT_METADATA_SERVER: str(self.metadata_server),
                        OPT_RANK_TABLE_PORT: str(self.rank_table_port),
                        OPT_TLS_CERT: str(self.tls_cert), OPT_TLS_KEY: str(self.tls_key),
                        OPT_TLS_CA: str(self.tls_ca)})
        optional = {OPT_MEM_POOL: self.mem_pool_cfg or None,
                    OPT_HOST_MEM_POOL: self.host_mem_pool_cfg or None,
                    OPT_LINK_TOTAL_TIME: self.link_total_time,
                    OPT_LINK_RETRY_COUNT: self.link_retry_count,
                    OPT_ENABLE_CACHE_MANAGER: _flag(self.enable_cache_manager),
                    OPT_REMOTE_CACHE_ACCESSIBLE: _flag(self.enable_remote_cache_accessible),
                    OPT_RDMA_TRAFFIC_CLASS: self.rdma_traffic_class,
                    OPT_RDMA_SERVICE_LEVEL: self.rdma_service_level,
                    "llm.LocalCommRes": self.local_comm_res,
                    "llm.TransferBackend": self.transfer_backend,
                    "llm.MemoryUtilization": self.mem_utilization,
                    OPT_DEVICE_TYPE: self.device_type or None,
                    OPT_DEVICE_POOL: self.device_mem_pool_size,
                    OPT_DEVICE_CHUNK: self.device_chunk_size}
        options.update({k: str(v) for k, v in optional.items() if v is not None})
        return options


def _flag(value):
    return None if value is None else ("1" if value else "0")


def _int_option(options, key, default, low=1, high=None):
    text = options.get(key, "")
    if text in ("", None):
        return default
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"option {key}={text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bounds = f"in {low}..{high}" if high is not None else f"at least {low}"
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"option {key}={value} must be {bounds}")
    return value


def _pool_config(options):
    """The buffer pool's configuration and whether one was given:
    llm.BufPoolCfg, else the memory_size of llm.HostMemPoolConfig, else of
    llm.MemPoolConfig (every cache here is host memory, so the one pool
    serves what llm_datadist splits into a device and a host pool)."""
    if options.get(OPT_BUF_POOL):
        return BufPoolConfig.parse(options[OPT_BUF_POOL]), True
    for key in (OPT_HOST_MEM_POOL, OPT_MEM_POOL):
        text = options.get(key)
        if not text:
            continue
        try:
            cfg = json.loads(text)
            size = cfg["memory_size"]
        except (ValueError, TypeError, KeyError):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"option {key}={text!r}: expected JSON with \"memory_size\" "
                               "(bytes)") from None
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"option {key}: memory_size must be a positive integer")
        for extra in sorted(set(cfg) - {"memory_size"}):
            _log_once(f"{key}.{extra}", f"{key}: {extra!r} has no effect here (only "
                      "memory_size sizes the buffer pool)")
        return BufPoolConfig(pool_size=size), True
    return BufPoolConfig(), False


def _report_ignored(options):
    for key, value in options.items():
        if key in _KNOWN:
            continue
        why = NO_EFFECT.get(key, "not an option kvcache knows")
        _log_once(key, f"option {key}={value!r} has no effect here: {why}")
    if options.get(OPT_ENABLE_CACHE_MANAGER) == "0":
        _log_once(OPT_ENABLE_CACHE_MANAGER, f"{OPT_ENABLE_CACHE_MANAGER}=0 has no effect: "
                  "kvcache always runs llm_datadist's cache-manager mode")


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
    """llm_datadist's LLMDataDist(role, cluster_id) in its cache-manager mode.
    ``role``: an LLMRole (or its value 1..3, or its name); ``cluster_id``:
    0..2**63-1 (the engine's wire format carries signed 64-bit ids). Any
    role links to any role in either direction."""

    @public
    def __init__(self, role, cluster_id):
        self.role = LLMRole(role)
        self.cluster_id = checks.integer(cluster_id, "cluster_id", 0, (1 << 63) - 1)
        self._engine = None
        self._pool = None
        self._cache_manager = None
        self._lock = threading.Lock()
        self.transport = None
        self.transport_reason = ""
        self._discovery = None

    @public
    def init(self, options):
        """Start: buffer pool, engine, listener (from the options of
        LLMConfig.generate_options()). A second init while initialised does
        nothing, as llm_datadist's; after finalize() it starts afresh.
        Options it cannot honour are logged once each (NO_EFFECT)."""
        if self._engine is not None:
            return
        options = {str(k): v for k, v in dict(options).items()}
        _report_ignored(options)
        listen = options.get(OPT_LISTEN) or options.get(OPT_LISTEN_OURS) or ""
        if listen:
            parse_address(listen)
        self.sync_timeout_ms = _int_option(options, OPT_SYNC_TIMEOUT, 1000)
        self.link_timeout_ms = _int_option(options, OPT_LINK_TIMEOUT, 3000)
        self.link_total_time_s = _int_option(options, OPT_LINK_TOTAL_TIME, 0, 0, (1 << 32) - 1)
        self.link_retry_count = _int_option(options, OPT_LINK_RETRY_COUNT, 1, 1, 100)
        device = OPT_DEVICE_ID if options.get(OPT_DEVICE_ID) else OPT_DEVICE_ID_OURS
        self.device_id = _int_option(options, device, 0, 0)
        traffic_class = _int_option(options, OPT_RDMA_TRAFFIC_CLASS, 0, 0, 255)
        service_level = _int_option(options, OPT_RDMA_SERVICE_LEVEL, 0, 0, 15)
        self.rank_table_port = _int_option(options, OPT_RANK_TABLE_PORT, DEFAULT_BASE_PORT,
                                           1, 65535)
        self.transport, self.transport_reason = choose_transport(
            options.get(OPT_TRANSPORT, "auto") or "auto")
        log.info("cluster %d: transport %s (%s)", self.cluster_id, self.transport,
                 self.transport_reason)
        pool_config, pool_configured = _pool_config(options)
        pool = BufferPool(pool_config)
        self._engine = None
        try:
            self._discovery = discovery.open_discovery(options.get(OPT_METADATA_SERVER, ""))
            # The engine listens once the cache manager serves its calls, so
            # no peer links to a cluster that cannot answer its lookups yet.
            self._engine = TransferEngine(f"cluster-{self.cluster_id}", listen=None,
                                          cluster_id=self.cluster_id,
                                          role=self.role.engine_role,
                                          transport=self.transport,
                                          timeout_ms=self.link_timeout_ms,
                                          device_id=self.device_id,
                                          auth_key=options.get(OPT_AUTH_KEY) or None,
                                          rdma_traffic_class=traffic_class,
                                          rdma_service_level=service_level,
                                          tls_cert=options.get(OPT_TLS_CERT) or None,
                                          tls_key=options.get(OPT_TLS_KEY) or None,
                                          tls_ca=options.get(OPT_TLS_CA) or None)
            self._cache_manager = CacheManager(
                self._engine, pool, self.cluster_id, self.sync_timeout_ms,
                pool_configured=pool_configured,
                remote_cache_accessible=options.get(OPT_REMOTE_CACHE_ACCESSIBLE) == "1",
                device=DeviceConfig(options.get(OPT_DEVICE_TYPE, ""), self.device_id,
                                    _int_option(options, OPT_DEVICE_POOL, 0, 0) or None,
                                    _int_option(options, OPT_DEVICE_CHUNK, 0, 0) or None))
            if listen:
                self._engine.start_listening(listen)
            self._publish()
            self._rank_links = RankTableLinks(self._engine, self.cluster_id)
        except BaseException:
            # Unwind in the order finalize closes: what each part holds
            # (threads, sockets, registrations) goes with it.
            if self._cache_manager is not None:
                self._cache_manager.close()
            if self._engine is not None:
                self._engine.close()
            if self._discovery is not None:
                self._discovery.close()
            pool.close()
            self._engine = self._cache_manager = self._discovery = None
            raise
        self._pool = pool

    def _publish(self):
        """Where this cluster listens, under its cluster id (a record only
        while it listens; with a metadata server)."""
        engine, key = self._engine, discovery.cluster_key(self.cluster_id)
        if not engine.address:
            self._discovery.withdraw(key)
            return
        self._discovery.publish(key, {"name": engine.name, "listen": engine.address,
                                      "transport": engine.transport.name,
                                      "cluster_id": self.cluster_id, "role": engine.role})

    def _republish(self):
        """_publish after the rank-table flow moved the listener: members
        reach each other at the rank table's addresses, so a metadata
        server that does not answer costs only lookups by cluster id."""
        try:
            self._publish()
        except LLMException as exc:
            log.warning("cluster %d: publishing the listen address failed: %s",
                        self.cluster_id, exc)

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
        """Link to each cluster's first remote address (a cluster given
        without one is looked up by its id on the metadata server; this side
        is the client of these links, whatever the roles). Returns (status,
        [status per cluster]); LLM_SUCCESS only if all linked. ``timeout``:
        ms per attempt, 1..2**31-1. An unreachable cluster is tried
        link_retry_count times within link_total_time (s; 0: one timeout
        per attempt). LLM_ALREADY_LINK when this side already made a live
        link to the cluster (a link the cluster made to us does not count)."""
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
        if not isinstance(info, LLMClusterInfo) or not (info.remote_ip_info
                                                        or self._discovery.uses_server):
            return LLMStatusCode.LLM_PARAM_INVALID
        existing = engine.find_peer(info.remote_cluster_id, inbound=False)
        if existing is not None and existing.state == LinkState.LINKED:
            return LLMStatusCode.LLM_ALREADY_LINK
        if info.remote_ip_info:
            host, port = info.remote_ip_info[0]
        else:
            try:
                record = self._discovery.resolve(discovery.cluster_key(info.remote_cluster_id))
            except LLMException as exc:
                return self._link_failed(info.remote_cluster_id, exc.status_code,
                                         f"looking it up failed: {exc}")
            if record is None:
                return self._link_failed(info.remote_cluster_id, LLMStatusCode.LLM_LINK_FAILED,
                                         f"it is not published at {self._discovery.endpoint}")
            host, port = parse_address(record["listen"])
        address = format_address(host, port)
        attempts = self.link_retry_count
        total_s = self.link_total_time_s or attempts * timeout / 1000
        deadline = time.monotonic() + total_s
        for attempt in range(1, attempts + 1):
            left_ms = int((deadline - time.monotonic()) * 1000)
            try:
                peer = engine.connect(address, timeout_ms=max(1, min(timeout, left_ms)))
                break
            except LLMException as exc:
                retry = exc.status_code in (LLMStatusCode.LLM_LINK_FAILED,
                                            LLMStatusCode.LLM_TIMEOUT)
                left_s = deadline - time.monotonic()
                cause = f"link to {address} (attempt {attempt} of {attempts}) failed: {exc}"
                if not retry or attempt == attempts or left_s <= 0:
                    return self._link_failed(info.remote_cluster_id, exc.status_code, cause)
                log.warning("cluster %d: to cluster %d: %s", self.cluster_id,
                            info.remote_cluster_id, cause)
                # Spread what is left of the total time over the attempts left.
                time.sleep(min(left_s / (attempts - attempt + 1), 1.0))
        if peer.cluster_id != info.remote_cluster_id:
            engine.disconnect(peer, force=True)
            return self._link_failed(info.remote_cluster_id, LLMStatusCode.LLM_LINK_FAILED,
                                     f"{address} is cluster {peer.cluster_id}, not "
                                     f"{info.remote_cluster_id}")
        self._cache_manager.link_failed(info.remote_cluster_id, None)
        return LLMStatusCode.LLM_SUCCESS

    def _link_failed(self, cluster_id, status, cause):
        """Log why a link to ``cluster_id`` failed and keep it for the cache
        manager, whose transfers to that cluster then say it."""
        log.warning("cluster %d: to cluster %d: %s", self.cluster_id, cluster_id, cause)
        self._cache_manager.link_failed(cluster_id, cause)
        return status

    def _link_to(self, engine, cluster_id):
        """The link unlink/status calls mean: the one this side made to the
        cluster, else the one the cluster made to us."""
        return (engine.find_peer(cluster_id, inbound=False)
                or engine.find_peer(cluster_id, inbound=True))

    @public
    def unlink_clusters(self, clusters, timeout=3000, force=False):
        """Unlink each cluster (the link this side made to it, else the one
        it made to us). Returns (status, [status per cluster]). Without
        ``force`` the peer is told and both ends close (LLM_LINK_BUSY while
        transfers run). ``force`` is local, as llm_datadist's: our end
        closes (aborting its transfers) without telling the peer, which sees
        its end FAILED until it unlinks too. Unlinking a link that is
        already gone (never made, unlinked by the peer, failed) succeeds and
        clears its FAILED status."""
        engine = self._started()
        timeout = checks.timeout_ms(timeout, "timeout")
        results = []
        for info in clusters:
            if not isinstance(info, LLMClusterInfo):
                results.append(LLMStatusCode.LLM_PARAM_INVALID)
                continue
            peer = self._link_to(engine, info.remote_cluster_id)
            if peer is None:
                engine.links.forget_failure(info.remote_cluster_id)
                results.append(LLMStatusCode.LLM_SUCCESS)
                continue
            try:
                engine.disconnect(peer, force=force, timeout_ms=timeout, notify=not force)
                # A link that failed while we unlinked it is unlinked all the same.
                engine.links.forget_failure(info.remote_cluster_id)
                results.append(LLMStatusCode.LLM_SUCCESS)
            except LLMException as exc:
                results.append(exc.status_code)
        ok = all(r == LLMStatusCode.LLM_SUCCESS for r in results)
        return (LLMStatusCode.LLM_SUCCESS if ok else LLMStatusCode.LLM_UNLINK_FAILED), results

    @public
    def check_link_status(self, remote_cluster_id):
        """The LinkState of the link to a cluster (the one this side made,
        else the one it made to us): FAILED when the last one failed (until
        the next link or an unlink), IDLE when there is none."""
        engine = self._started()
        peer = self._link_to(engine, remote_cluster_id)
        if peer is not None:
            return peer.state
        return LinkState.FAILED if engine.links.failure(remote_cluster_id) else LinkState.IDLE

    @public
    def link(self, comm_name, cluster_rank_info, rank_table):
        """The rank-table flow (as llm_datadist's link): every member calls
        it with the same ``rank_table`` (HCCL-style JSON text, version 1.0 or
        1.2) and ``cluster_rank_info`` ({cluster id: rank id}, ranks
        ascending). Returns the comm id (int, 1, 2, ... per LLMDataDist) at
        once; the links come up in the background within link_timeout ms:
        poll query_register_mem_status(comm_id) until OK (or FAILED). We
        listen at our member's device_ip and port (kvcache.rank_table).
        LLM_PARAM_INVALID naming the field for a bad table or one without
        this cluster, or when that address cannot be listened on. A member
        already linked (link_clusters, either direction) keeps its link and
        counts as linked at once. When the cluster listened nowhere before,
        its member address is published to the metadata server like any
        listen address."""
        self._started()
        comm_id = self._rank_links.link(comm_name, cluster_rank_info, rank_table,
                                        self.rank_table_port, self.link_timeout_ms)
        self._republish()
        return comm_id

    @public
    def unlink(self, comm_id):
        """Close the links of a comm (as llm_datadist's unlink; a member that
        unlinked first is skipped) and forget its id. LLM_PARAM_INVALID for
        an unknown comm id."""
        self._started()
        self._rank_links.unlink(comm_id, self.link_timeout_ms)
        self._republish()

    @public
    def query_register_mem_status(self, comm_id):
        """RegisterMemStatus of a comm: PREPARING while its links come up,
        OK once every member is linked, FAILED when one was not by the link
        timeout. LLM_PARAM_INVALID for an unknown comm id."""
        self._started()
        return self._rank_links.status(comm_id)

    @public
    def switch_role(self, role, switch_options=None):
        """Become ``role``, as llm_datadist's cache-manager mode: no
        enable_switch_role needed, any role to any role. LLM_EXIST_LINK
        while links or rank-table comms remain (unlink first: a comm's
        member address may be the listener this call would stop). With switch_options
        {"llm.listenIpInfo": "ip:port"} the cluster listens there from now
        on; without it, it stops listening."""
        engine = self._started()
        role = LLMRole(role)
        if switch_options is not None and not isinstance(switch_options, dict):
            raise checks.invalid(f"switch_options must be a dict, got {switch_options!r}")
        options = switch_options or {}
        listen = options.get(OPT_LISTEN) or options.get(OPT_LISTEN_OURS) or ""
        if listen:
            parse_address(listen)
        comms = self._rank_links.comm_ids()
        if comms:
            raise LLMException(LLMStatusCode.LLM_EXIST_LINK,
                               f"unlink the rank-table comms {comms} first")
        # A peer's unlink returns once we answered its BYE; our side of that
        # link closes a moment later, when the connection drops.
        deadline = time.monotonic() + engine.timeout_ms / 1000
        for peer in engine.peers():
            peer.link.wait_leaves(LinkState.UNLINKING, max(0.0, deadline - time.monotonic()))
        live = [p for p in engine.peers() if p.state != LinkState.IDLE]
        if live:
            raise LLMException(LLMStatusCode.LLM_EXIST_LINK,
                               f"unlink first: {[p.name for p in live]}")
        engine.stop_listening()
        if listen:
            engine.start_listening(listen)
        engine.role = role.engine_role
        self.role = role
        self._publish()

    @public
    def finalize(self):
        """Unlink everything, free caches and the pool. Idempotent."""
        if self._engine is None:
            return
        engine, self._engine = self._engine, None
        self._rank_links.close(1000)
        self._cache_manager.close()
        engine.close()
        self._discovery.close()
        self._pool.close()
