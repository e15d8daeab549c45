"""One module per CLI command; see molora_ops.cli."""
