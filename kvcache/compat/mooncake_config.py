"""``mooncake.json``, the file vLLM's Mooncake P/D demo passes in
MOONCAKE_CONFIG_PATH::

    {"prefill_url": "127.0.0.1:13003", "decode_url": "127.0.0.1:14003",
     "metadata_server": "etcd://127.0.0.1:2379", "protocol": "tcp",
     "device_name": ""}

``metadata_server`` defaults to "P2PHANDSHAKE", ``protocol`` to "tcp",
``device_name`` to "". Keys the file has for other Mooncake parts
(``metadata_backend``, ``master_server_address``, ...) are ignored."""
import dataclasses
import json
import logging
import os

from kvcache.engine.discovery import P2P
from kvcache.status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

ENV_PATH = "MOONCAKE_CONFIG_PATH"


@dataclasses.dataclass(frozen=True)
class MooncakeConfig:
    """What a prefill or decode process needs to start its TransferEngine:
    ``engine.initialize(config.prefill_url, config.metadata_server,
    config.protocol, config.device_name)`` on the prefill side (decode_url
    on the decode side)."""

    prefill_url: str
    decode_url: str
    metadata_server: str = P2P
    protocol: str = "tcp"
    device_name: str = ""


def load_config(path=None):
    """The MooncakeConfig in ``path`` (default: the file MOONCAKE_CONFIG_PATH
    names). LLM_PARAM_INVALID when there is no path, the file cannot be read,
    is not a JSON object, lacks prefill_url / decode_url or has a value that
    is not a string."""
    path = path or os.environ.get(ENV_PATH, "")
    if not path:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"no mooncake.json: pass a path or set {ENV_PATH}")
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as exc:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"{path}: not a JSON object")
    fields = {f.name for f in dataclasses.fields(MooncakeConfig)}
    ignored = sorted(set(data) - fields)
    if ignored:
        log.debug("%s: ignoring %s", path, ignored)
    values = {k: v for k, v in data.items() if k in fields}
    for key in ("prefill_url", "decode_url"):
        if key not in values:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"{path}: {key} is missing")
    for key, value in values.items():
        if not isinstance(value, str):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"{path}: {key} must be a string, got {value!r}")
    return MooncakeConfig(**values)
