"""The cache-aware, P/D-aware request router."""
