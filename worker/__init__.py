"""Device side: attention backends, models, weight loading, model runner, sampler, engine and
the worker actor."""
