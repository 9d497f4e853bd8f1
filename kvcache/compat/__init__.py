"""Drop-in entry points for users of other KV transfer libraries (FastDeploy, Mooncake)."""
