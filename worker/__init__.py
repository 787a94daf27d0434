"""Device side: attention backends, models, weight loading, model runner, sampler, engine."""
