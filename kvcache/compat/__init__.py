"""Entry points shaped like other KV-transfer libraries (FastDeploy,
Mooncake), one module per library, so their users switch by changing an
import. Each calls down into kvcache.engine; nothing below imports them."""
