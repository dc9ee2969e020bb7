"""The connector's halves (keys, metadata, scheduler half, worker half) driven directly, without vLLM."""
