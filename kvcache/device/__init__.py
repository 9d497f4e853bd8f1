"""KV caches in accelerator memory (NPU through ACL, GPU through CUDA): the
runtime seen as kvcache sees it (runtime), the device memory regions peers may
name (regions) and the staging pipeline that moves device bytes through pinned
host buffers (staging), below the cache manager and above the engine, whose
transports move host bytes only."""
