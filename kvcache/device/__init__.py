"""KV caches in accelerator memory (NPU through ACL, GPU through CUDA): the
runtime seen as kvcache sees it (runtime), the device memory regions peers may
name (regions), the staging pipeline that moves device bytes through pinned
host buffers (staging), the device caches of the cache manager (caches) and
the TransferEngine whose registered memory may lie on a device (engine):
below the cache manager and the compat APIs, above the host engine, whose
transports move host bytes only."""
