"""bootd: network boot service for stateless (diskless) clusters."""

__version__ = "0.1.0"
