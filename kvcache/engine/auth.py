"""Authenticated links: a shared secret proven by both ends of a handshake
with an HMAC challenge-response, never sent itself.

The initiator's HELLO carries a fresh nonce; the listener answers with its
own nonce and proof_L = HMAC(key, "listener" | transcript); the initiator
checks it (constant-time) and answers READY with proof_I = HMAC(key,
"initiator" | transcript), which the listener checks before the link exists.
The transcript binds both nonces and both names, so a proof cannot be
replayed on another handshake or reflected back. Without a key configured
on either side links work as before."""
import hashlib
import hmac
import ipaddress
import logging
import secrets

from kvcache.checks import invalid
from kvcache.config import env_str

log = logging.getLogger(__name__)

NONCE_BYTES = 32
MIN_KEY_BYTES = 16


def load_key(explicit=None):
    """The shared secret as bytes, or None: ``explicit`` (str or bytes), else
    KVCACHE_AUTH_KEY, else the contents of the file KVCACHE_AUTH_KEY_FILE
    (one trailing newline dropped). LLM_PARAM_INVALID for a key shorter
    than 16 bytes or a file that cannot be read."""
    key = explicit
    if key is None and env_str("KVCACHE_AUTH_KEY"):
        key = env_str("KVCACHE_AUTH_KEY")
    if key is None and env_str("KVCACHE_AUTH_KEY_FILE"):
        path = env_str("KVCACHE_AUTH_KEY_FILE")
        try:
            with open(path, "rb") as f:
                key = f.read()
        except OSError as exc:
            raise invalid(f"KVCACHE_AUTH_KEY_FILE {path!r}: {exc.strerror}") from None
        key = key[:-1] if key.endswith(b"\n") else key
    if key is None or key == "" or key == b"":
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)):
        raise invalid(f"auth_key must be str or bytes, got {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise invalid(f"auth_key of {len(key)} bytes: use at least {MIN_KEY_BYTES} "
                      "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
    return bytes(key)


def nonce():
    return secrets.token_hex(NONCE_BYTES)


def proof(key, side, initiator_nonce, listener_nonce, initiator, listener):
    """HMAC-SHA256 (hex) of one side of one handshake."""
    transcript = "\n".join((side, initiator_nonce, listener_nonce, initiator, listener))
    return hmac.new(key, transcript.encode(), hashlib.sha256).hexdigest()


def verify(key, given, side, initiator_nonce, listener_nonce, initiator, listener):
    """Whether ``given`` is the other side's proof (constant-time compare)."""
    if not isinstance(given, str):
        return False
    expected = proof(key, side, initiator_nonce, listener_nonce, initiator, listener)
    return hmac.compare_digest(given.encode(), expected.encode())


def warn_if_exposed(host, key):
    """One warning when a listener without a secret accepts more than this
    machine: anyone who reaches the port could read and write its caches."""
    if key is not None:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("listening on %s without a shared secret: any process that reaches this "
                    "port can link and read or write the registered memory; set auth_key "
                    "(LLMConfig.auth_key, TransferEngine(auth_key=...), KVCACHE_AUTH_KEY or "
                    "KVCACHE_AUTH_KEY_FILE)", host)
