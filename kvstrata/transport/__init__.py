"""Moving bytes between processes and machines: the wire protocol and the tcp, shm and nixl transports."""
