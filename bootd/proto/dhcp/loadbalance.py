"""The RFC 3074 load-balancing hash: which of N servers answers a client (Kea's HA load-balancing).

Every server computes the same 8-bit hash (Pearson's hash over the client identifier, option 61,
else the hardware address in chaddr) with no state shared but the list of live servers, so N
servers on one segment (or behind one relay) split the clients without talking per packet.
The hash selects one of 256 buckets; with the live servers sorted by id, bucket ``b`` belongs to
server ``b % N`` (Kea's ``hash % active_servers``), so each server owns a fixed set of buckets.
Pure: no sockets, no clock.
"""

from __future__ import annotations

from typing import Final

from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import BOOTREQUEST, HEADER_SIZE, MAGIC_COOKIE, OPT_END, OPT_OVERLOAD, OPT_PAD, DhcpPacket

__all__ = ["BUCKETS", "MIXING_TABLE", "bucket", "client_key", "lb_hash", "owner_index", "wire_split_key"]

BUCKETS: Final = 256

# RFC 3074 section 6: a "mixing table" of the 256 byte values in pseudo-random order.
MIXING_TABLE: Final = bytes((
    251, 175, 119, 215, 81, 14, 79, 191, 103, 49, 181, 143, 186, 157, 0, 232,
    31, 32, 55, 60, 152, 58, 17, 237, 174, 70, 160, 144, 220, 90, 57, 223,
    59, 3, 18, 140, 111, 166, 203, 196, 134, 243, 124, 95, 222, 179, 197, 65,
    180, 48, 36, 15, 107, 46, 233, 130, 165, 30, 123, 161, 209, 23, 97, 16,
    40, 91, 219, 61, 100, 10, 210, 109, 250, 127, 22, 138, 29, 108, 244, 67,
    207, 9, 178, 204, 74, 98, 126, 249, 167, 116, 34, 77, 193, 200, 121, 5,
    20, 113, 71, 35, 128, 13, 182, 94, 25, 226, 227, 199, 75, 27, 41, 245,
    230, 224, 43, 225, 177, 26, 155, 150, 212, 142, 218, 115, 241, 73, 88, 105,
    39, 114, 62, 255, 192, 201, 145, 214, 168, 158, 221, 148, 154, 122, 12, 84,
    82, 163, 44, 139, 228, 236, 205, 242, 217, 11, 187, 146, 159, 64, 86, 239,
    195, 42, 106, 198, 118, 112, 184, 172, 87, 2, 173, 117, 176, 229, 247, 253,
    137, 185, 99, 164, 102, 147, 45, 66, 231, 52, 141, 211, 194, 206, 246, 238,
    56, 110, 78, 248, 63, 240, 189, 93, 92, 51, 53, 183, 19, 171, 72, 50,
    33, 104, 101, 69, 8, 252, 83, 120, 76, 135, 85, 54, 202, 125, 188, 213,
    96, 235, 136, 208, 162, 129, 190, 132, 156, 38, 47, 1, 7, 254, 24, 4,
    216, 131, 89, 21, 28, 133, 37, 153, 149, 80, 170, 68, 6, 169, 234, 151,
))


def lb_hash(key: bytes) -> int:
    """RFC 3074 section 6: start from the key's length (mod 256), mix in the bytes from the last to the first."""
    table = MIXING_TABLE
    h = len(key) & 0xFF
    for byte in reversed(key):
        h = table[h ^ byte]
    return h


def client_key(packet: DhcpPacket) -> bytes:
    """What the hash is over (RFC 3074 section 5): option 61 when present and not empty, else chaddr's hlen bytes.

    Option 61's data includes its type byte, as Kea hashes it. Malformed options raise RemoteProtocolError.
    """
    cid = packet.options.get(o.CLIENT_ID)
    if cid:
        return cid
    return packet.chaddr[:min(packet.hlen, 16)]


def bucket(packet: DhcpPacket) -> int:
    return lb_hash(client_key(packet))


def owner_index(bucket_: int, servers: int) -> int:
    """Which of ``servers`` live servers (sorted by id) owns a bucket: Kea's ``hash % active_servers``."""
    return bucket_ % servers


_COOKIE_END: Final = HEADER_SIZE + len(MAGIC_COOKIE)  # where the options start


def wire_split_key(data: bytes, split_types: frozenset[int]) -> bytes | None:
    """The load-balancing key of a raw datagram whose message type is in ``split_types``, without parsing it.

    Why: with several servers on one segment every server hears every broadcast, and most belong to a peer.
    Telling them apart before the queue costs a few byte reads instead of a full parse, and keeps a peer's
    clients from filling the queue. Returns the same key as ``client_key`` on the parsed packet, or None
    whenever that is not certain (no cookie, option overload, a truncated or repeated option, another message
    type): the packet then takes the full path, which decides as before.
    """
    n = len(data)
    if n < _COOKIE_END or data[HEADER_SIZE:_COOKIE_END] != MAGIC_COOKIE or data[0] != BOOTREQUEST:
        return None
    hlen = data[2]
    if hlen > 16:
        return None
    i = _COOKIE_END
    mtype = -1
    cid: bytes | None = None
    while i < n:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            break
        if i + 1 >= n:
            return None
        end = i + 2 + data[i + 1]
        if end > n:
            return None
        if code == o.MESSAGE_TYPE:
            if mtype != -1 or end != i + 3:
                return None
            mtype = data[i + 2]
        elif code == o.CLIENT_ID:
            if cid is not None:
                return None  # repeated: RFC 3396 concatenation, left to the parser
            cid = data[i + 2:end]
        elif code == OPT_OVERLOAD:
            return None  # option overload: options in sname/file too
        i = end
    if mtype not in split_types:
        return None
    return cid if cid else data[28:28 + hlen]
