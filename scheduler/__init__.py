"""Policy: requests, sampling parameters, continuous batching, routing, job state and the
scheduler actor."""
