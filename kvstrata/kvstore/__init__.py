"""The tiered store engine: KV layout, key scheme, tiers (device, host, disk), eviction, and the Store."""
