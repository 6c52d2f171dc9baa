"""`edgeprune export` (stub: filled in by its owner)."""
