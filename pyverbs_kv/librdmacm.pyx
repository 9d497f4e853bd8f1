"""Python side of the rdma_cm enumerations declared in librdmacm.pxd."""
