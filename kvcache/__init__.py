"""kvcache (placeholder replaced below)"""
