"""Python side of the libibverbs enumerations declared in libibverbs_enums.pxd."""
