"""`edgeprune targets` (stub: filled in by its owner)."""
