"""Status codes and the exception every kvcache API raises, after
LLM-DataDist's LLMStatusCode / LLMException (same names, same values: the
0x5010B0xx codes of its llm_error_codes.h, the two runtime codes of its
Python package, and LLM_UNKNOWN_ERROR = -1 as that package defines it)."""
from enum import IntEnum


class LLMStatusCode(IntEnum):
    LLM_SUCCESS = 0x0
    LLM_FAILED = 0xFFFFFFFF
    LLM_WAIT_PROCESS_TIMEOUT = 0x5010B001
    LLM_KV_CACHE_NOT_EXIST = 0x5010B002
    LLM_REPEAT_REQUEST = 0x5010B003
    LLM_REQUEST_ALREADY_COMPLETED = 0x5010B004
    LLM_PARAM_INVALID = 0x5010B005
    LLM_ENGINE_FINALIZED = 0x5010B006
    LLM_NOT_YET_LINK = 0x5010B007
    LLM_ALREADY_LINK = 0x5010B008
    LLM_LINK_FAILED = 0x5010B009
    LLM_UNLINK_FAILED = 0x5010B00A
    LLM_NOTIFY_PROMPT_UNLINK_FAILED = 0x5010B00B
    LLM_CLUSTER_NUM_EXCEED_LIMIT = 0x5010B00C
    LLM_PROCESSING_LINK = 0x5010B00D
    LLM_DEVICE_OUT_OF_MEMORY = 0x5010B00E
    LLM_PREFIX_ALREADY_EXIST = 0x5010B00F
    LLM_PREFIX_NOT_EXIST = 0x5010B010
    LLM_SEQ_LENOVERLIMIT = 0x5010B011       # llm_datadist's spelling (C: LLM_SEQ_LEN_OVER_LIMIT)
    LLM_NO_FREE_BLOCK = 0x5010B012
    LLM_BLOCKS_OUT_OF_MEMORY = 0x5010B013
    LLM_EXIST_LINK = 0x5010B018
    LLM_FEATURE_NOT_ENABLED = 0x5010B019
    LLM_TIMEOUT = 0x5010B01A
    LLM_LINK_BUSY = 0x5010B01B
    LLM_OUT_OF_MEMORY = 0x5010B01C
    LLM_DEVICE_MEM_ERROR = 507053           # the accelerator runtime's memory-UCE code
    LLM_SUSPECT_REMOTE_ERROR = 507057       # the accelerator runtime's "peer memory faulted"
    LLM_UNKNOWN_ERROR = -1


class LLMException(RuntimeError):
    """A kvcache call failed. ``status_code`` is an LLMStatusCode; the message
    names what was wrong.

    Both calling forms work: ours, ``LLMException(status_code, message="")``,
    and llm_datadist's, ``LLMException(message, ..., status_code=code)``
    (default LLM_SUCCESS there, as in llm_datadist). A status that is no
    LLMStatusCode becomes LLM_UNKNOWN_ERROR."""

    def __init__(self, *args, status_code=None):
        if status_code is None and args and _is_code(args[0]):
            status_code, args = args[0], args[1:]
        self.status_code = _code(LLMStatusCode.LLM_SUCCESS if status_code is None
                                 else status_code)
        self.message = " ".join(str(a) for a in args if a != "")
        super().__init__(f"{self.status_code.name}: {self.message}" if self.message
                         else self.status_code.name)

    def __reduce__(self):
        # Sent between processes with its code (the default would rebuild it
        # from the formatted text alone).
        return type(self), (int(self.status_code), self.message)


def _is_code(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _code(value):
    try:
        return LLMStatusCode(value)
    except ValueError:
        return LLMStatusCode.LLM_UNKNOWN_ERROR
