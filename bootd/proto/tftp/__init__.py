"""TFTP (RFC 1350 with options 2347/2348/2349/7440): codec and read-transfer state machine.

Read-only by design: a boot server has no business accepting uploads.
"""

from bootd.proto.tftp.packet import ErrorCode, Opcode, Request, parse_packet
from bootd.proto.tftp.session import FileSource, MemorySource, ReadSession, SessionLimits, SessionState

__all__ = [
    "ErrorCode",
    "FileSource",
    "MemorySource",
    "Opcode",
    "ReadSession",
    "Request",
    "SessionLimits",
    "SessionState",
    "parse_packet",
]
