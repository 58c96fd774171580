"""Results to the PACS: the durable queue (queue) and C-STORE with backoff (send)."""
