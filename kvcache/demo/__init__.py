"""The model the disaggregated demo serves: a small Llama-style decoder whose
KV cache lives in paged blocks caches (torch only; the transport side hands
it tensors)."""
