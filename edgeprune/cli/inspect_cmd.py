"""`edgeprune inspect` (stub: filled in by its owner)."""
