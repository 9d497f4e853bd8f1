"""Argument checks every public call shares: bad input is an LLMException
with LLM_PARAM_INVALID naming what was wrong, never a bare Python exception."""
import functools
import logging

from kvcache.status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

MAX_TIMEOUT_MS = (1 << 31) - 1        # what poll() and the C paths take


def invalid(message):
    return LLMException(LLMStatusCode.LLM_PARAM_INVALID, message)


def timeout_ms(value, what="timeout_ms"):
    """A deadline in ms: an integer in 1..2**31-1."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{what} must be an integer number of ms, got {value!r}")
    if not 0 < value <= MAX_TIMEOUT_MS:
        raise invalid(f"{what} must be in 1..{MAX_TIMEOUT_MS} ms, got {value}")
    return value


def integer(value, what, low=None, high=None):
    """An integer (not a bool, float or string) in [low, high]."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise invalid(f"{what} must be an integer, got {value!r}")
    value = int(value.__index__())
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(f"{what} {value} outside {low}..{high}")
    return value


def public(func):
    """A public call: a bare exception from bad arguments that no explicit
    check caught (a wrong type deep inside) becomes LLM_PARAM_INVALID naming
    the call; LLMException passes through."""
    @functools.wraps(func)
    def call(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LLMException:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError, KeyError,
                IndexError) as exc:
            log.debug("%s: bad argument", func.__qualname__, exc_info=True)
            raise invalid(f"{func.__qualname__}: bad argument ({type(exc).__name__}: "
                          f"{exc})") from None
    return call
