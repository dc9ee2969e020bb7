"""The shared vocabulary every layer speaks: keys, KV layout, chunk metadata, byte views.

It sits at the bottom, above only config, errors and units: the store, the transports, the kernels, the
client, the connector and the router all import it, and it imports none of them.
"""
