"""What every socket needs beneath the clients and servers: opening endpoints and receiving frames (transport),
CURVE keys (security), the same-host shared-memory fast path (shm) and glibc allocator thresholds (allocator).

Private: the public face is :class:`tensorcom.Connection` and :class:`tensorcom.Server`.
"""
