"""`edgeprune bench` (stub: filled in by its owner)."""
