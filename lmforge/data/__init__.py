"""Token data: document sources (read) and token shards (write, memory-mapped read)."""
