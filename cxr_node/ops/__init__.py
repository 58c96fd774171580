"""Operating the node: status, retention, Prometheus metrics."""
