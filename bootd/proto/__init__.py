"""Sans-I/O protocol cores: bytes and `now` in, events, bytes and timers out.

Nothing here may touch a socket, an event loop or the database, so every
branch can be tested by feeding bytes.
"""
