"""Transports move the bytes of descriptor arrays for a link. One interface
(kvcache.transports.base.Transport), one module per transport."""
