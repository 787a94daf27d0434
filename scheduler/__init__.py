"""Policy: request state, sampling parameters, continuous batching."""
