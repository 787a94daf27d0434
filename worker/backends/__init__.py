"""Attention backends: one per device kind, all implementing worker.attention.AttentionBackend."""
