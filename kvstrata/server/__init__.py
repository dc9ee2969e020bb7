"""The cache server daemon (`kvstrata serve`) and its admin HTTP API."""
