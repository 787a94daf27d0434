"""Client-facing face of pagedserve: config, public API, CLI."""
