"""`edgeprune compress` (stub)."""
