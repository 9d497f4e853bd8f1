"""The one-sided engine: ``TransferEngine`` (the facade) over the region
registry (``regions``), the link manager (``links``: listener, handshake,
peer table), control calls (``rpc``), asynchronous requests and
notifications (``requests``); segment discovery (``discovery``: P2P or etcd)
sits beside it, used by the layers above."""
from kvcache.engine.address import parse_address
from kvcache.engine.engine import TRANSPORTS, TransferEngine
from kvcache.engine.link import Link, LinkState
from kvcache.engine.peer import Peer
from kvcache.engine.requests import TransferRequest

__all__ = ["Link", "LinkState", "Peer", "TRANSPORTS", "TransferEngine", "TransferRequest",
           "parse_address"]
