"""Tests of the vLLM connector and the harness that runs a real vLLM CPU engine for them."""
