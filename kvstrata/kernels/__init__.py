"""GPU data movement: paged gather/scatter and KV compression (Triton kernels with torch references)."""
