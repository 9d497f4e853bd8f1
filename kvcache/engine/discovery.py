"""Segment discovery: how an engine is found by name.

``metadata_server`` (as Mooncake spells it) chooses the service:

- ``"P2PHANDSHAKE"`` or ``""`` (the default): no server. A segment's name is
  its listen address ("host:port"); peers reach it directly and learn its
  regions in the link handshake.
- an etcd v3 endpoint, ``"etcd://host:port"`` or ``"host:port"``: every
  engine publishes a record under a key bound to a lease that a keepalive
  thread renews; peers resolve names there. A process that dies stops
  renewing, and etcd deletes its keys when the lease expires (``ttl_s``).

Key layout (values are JSON objects)::

    /kvcache/v1/segment/<segment name>   {"name", "listen", "transport",
                                          "regions": [[id, addr, length], ...],
                                          "cluster_id", "role"}
    /kvcache/v1/cluster/<cluster id>     the same record, for LLMDataDist
                                         links by cluster id

The etcd client is ``etcd3gw`` (etcd's JSON gateway), imported when an etcd
endpoint is first used, so the package works without it; it talks to the
gateway's ``/v3/`` paths, which every etcd from 3.4 on serves (Debian 12's
etcd-server is 3.4; ``/v3beta/`` went away in 3.5)."""
import json
import logging
import threading

from kvcache.config import env_int
from kvcache.engine.address import format_address, parse_address
from kvcache.status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

P2P = "P2PHANDSHAKE"
PREFIX = "/kvcache/v1/"
DEFAULT_TTL_S = 10
DEFAULT_CALL_TIMEOUT_S = 3.0
ETCD_API_PATH = "/v3/"


def segment_key(name):
    return f"{PREFIX}segment/{name}"


def cluster_key(cluster_id):
    return f"{PREFIX}cluster/{int(cluster_id)}"


def open_discovery(metadata_server, ttl_s=None, call_timeout_s=DEFAULT_CALL_TIMEOUT_S):
    """The discovery service ``metadata_server`` names (see the module doc).
    ``ttl_s``: the etcd lease, in seconds (default KVCACHE_ETCD_TTL_S, else
    10): how long a dead process stays findable.
    LLM_PARAM_INVALID for a malformed endpoint, LLM_FEATURE_NOT_ENABLED
    when etcd3gw is not installed, LLM_LINK_FAILED when etcd does not
    answer within ``call_timeout_s``."""
    text = (metadata_server or "").strip()
    if text in ("", P2P):
        return PeerToPeer()
    if ttl_s is None:
        ttl_s = env_int("KVCACHE_ETCD_TTL_S", DEFAULT_TTL_S)
    if not isinstance(ttl_s, int) or ttl_s < 1:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"lease ttl must be a whole number of seconds >= 1, got {ttl_s!r}")
    scheme, sep, rest = text.partition("://")
    if sep and scheme != "etcd":
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"metadata server {text!r}: only 'P2PHANDSHAKE' and etcd "
                           "('etcd://host:port' or 'host:port') are supported")
    host, port = parse_address(rest if sep else text)
    return Etcd(host, port, ttl_s, call_timeout_s)


class PeerToPeer:
    """No metadata server: a segment name is the address to link to."""

    uses_server = False

    def publish(self, key, record):
        pass

    def withdraw(self, key):
        pass

    def resolve(self, key):
        return None

    def close(self):
        pass


class Etcd:
    """Records in etcd under one lease of ``ttl_s`` seconds, renewed every
    ttl_s / 3 by a keepalive thread; every call to etcd has a deadline of
    ``call_timeout_s``. ``close`` stops the thread and revokes the lease
    (the records disappear at once)."""

    uses_server = True

    def __init__(self, host, port, ttl_s, call_timeout_s):
        try:
            import etcd3gw
            from etcd3gw import exceptions as etcd_errors
        except ImportError:
            raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                               "an etcd metadata server needs the 'etcd3gw' package "
                               "(pip install 'pyverbs-kv[etcd]')") from None
        self.endpoint = format_address(host, port)
        self._errors = (etcd_errors.Etcd3Exception, OSError)
        self._client = etcd3gw.Etcd3Client(host=host, port=port, timeout=call_timeout_s,
                                           api_path=ETCD_API_PATH)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._records = {}
        self._stop = threading.Event()
        self._lease = self._do("grant a lease", lambda: self._client.lease(ttl=ttl_s))
        self._thread = threading.Thread(target=self._keepalive, name="kv-etcd-keepalive",
                                        daemon=True)
        self._thread.start()

    def _do(self, what, call):
        try:
            return call()
        except self._errors as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"etcd at {self.endpoint}: {what} failed: {exc}") from None

    def publish(self, key, record):
        """Put ``record`` (a JSON-able dict) under ``key`` with our lease."""
        value = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._records[key] = value
            self._do(f"put {key}", lambda: self._client.put(key, value, lease=self._lease))

    def withdraw(self, key):
        with self._lock:
            self._records.pop(key, None)
            self._do(f"delete {key}", lambda: self._client.delete(key))

    def resolve(self, key):
        """The record under ``key``, or None when nobody publishes it."""
        with self._lock:                   # one request at a time on the client's session
            values = self._do(f"get {key}", lambda: self._client.get(key))
        if not values:
            return None
        try:
            return json.loads(values[0])
        except ValueError:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"etcd at {self.endpoint}: {key} holds no JSON record") from None

    def _keepalive(self):
        while not self._stop.wait(self.ttl_s / 3):
            try:
                with self._lock:
                    if self._lease.refresh() > 0:
                        continue
                    # The lease expired (we were stopped or cut off for longer
                    # than its ttl): take a new one and publish again.
                    log.warning("etcd lease %s expired; publishing again", self._lease.id)
                    self._lease = self._client.lease(ttl=self.ttl_s)
                    for key, value in self._records.items():
                        self._client.put(key, value, lease=self._lease)
            except Exception as exc:      # the thread outlives any one failed call
                log.warning("etcd at %s: keepalive failed (%r); retrying", self.endpoint, exc)

    def close(self, timeout_s=DEFAULT_CALL_TIMEOUT_S):
        """Stop the keepalive thread and revoke the lease. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout_s + self.ttl_s)
        try:
            self._lease.revoke()
        except self._errors as exc:
            log.warning("etcd at %s: revoking lease failed (%s); it expires in %d s",
                        self.endpoint, exc, self.ttl_s)

