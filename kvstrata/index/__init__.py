"""The global block index: embedded and Redis backends, engine KV-event ingestion, and prefix scoring."""
