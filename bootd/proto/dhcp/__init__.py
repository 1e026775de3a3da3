"""DHCPv4 / BOOTP / PXE codec and decisions, sans-I/O.

Everything here takes bytes (and a ``now`` where time matters) and returns
values or bytes; malformed input raises ``RemoteProtocolError`` with a
stable ``reason`` slug so the transport can count drops by cause.
"""
