"""Moving KV blocks between engines: the address format and the shm / TCP transports."""
