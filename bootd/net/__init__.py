"""Thin transports: move bytes between sockets and the services, decide nothing."""
