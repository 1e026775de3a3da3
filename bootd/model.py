"""Plain values that cross layer boundaries.

They are frozen dataclasses with no behaviour beyond validation, so a
protocol core, a service and a store can all speak about the same node
without importing each other.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Final

_MAC_HEX: Final = re.compile(r"^[0-9a-f]{12}$")


def _normal(value: str) -> bool:
    """``aa:bb:cc:dd:ee:ff``, lower case. Checked character by character: compiled (tools/compile.py), a tenth of the
    instructions of a regular expression's match, twice per DHCP exchange (callgrind, bench/dhcp/profile_service.py)."""
    if len(value) != 17 or not value.isascii():
        return False
    raw = value.encode()
    for i in range(17):
        c = raw[i]
        if i % 3 == 2:
            if c != 58:  # ":"
                return False
        elif not (48 <= c <= 57 or 97 <= c <= 102):  # 0-9, a-f
            return False
    return True


def normalize_mac(value: str | bytes) -> str:
    """Return a MAC as ``aa:bb:cc:dd:ee:ff``.

    Accepts raw 6 bytes (from a DHCP chaddr) or the text forms administrators
    paste: colons, dashes, dots (Cisco) or none, in any case.
    """
    if isinstance(value, (bytes, bytearray)):  # a tuple: isinstance with a union type is several times slower
        if len(value) != 6:
            raise ValueError(f"a MAC address is 6 bytes, got {len(value)}")
        return bytes(value).hex(":")  # on every DHCP packet: the C formatter, not a join over 6 f-strings
    if _normal(value):  # already normal (the store's own calls, on every DHCP exchange): no rewriting
        return value
    hexdigits = re.sub(r"[:\-.]", "", value.strip().lower())
    if not _MAC_HEX.match(hexdigits):
        raise ValueError(f"not a MAC address: {value!r} (expected e.g. 52:54:00:12:34:56)")
    return ":".join(hexdigits[i : i + 2] for i in range(0, 12, 2))


class Firmware(enum.StrEnum):
    """What kind of boot ROM is talking, which decides the network boot program."""

    BIOS = "bios"
    UEFI_X64 = "uefi-x64"
    UEFI_IA32 = "uefi-ia32"
    UEFI_ARM64 = "uefi-arm64"
    UEFI_HTTP = "uefi-http"
    UNKNOWN = "unknown"


class State(enum.StrEnum):
    """Node lifecycle (a contract: operators' scripts match on these names)."""

    DISCOVERED = "discovered"
    PXE = "pxe"
    STAGE1 = "stage1"
    FETCHING = "fetching"
    VERIFIED = "verified"
    BOOTED = "booted"
    READY = "ready"
    STALE = "stale"
    DEAD = "dead"
    FAILED = "failed"
    DISABLED = "disabled"


# Not frozen: one per DHCP packet, and frozen costs an object.__setattr__ per field. init=False, eq=False: a
# hand-written __init__ and __eq__ compile (tools/compile.py, mypyc); a dataclass's generated ones stay interpreted
# (the DHCP path compares a REQUEST's machine with its OFFER's: 3,500 instructions a call generated, callgrind).
@dataclass(slots=True, init=False, eq=False)
class Machine:
    """What a boot request tells us about the hardware asking."""

    mac: str
    arch: int | None
    firmware: Firmware
    ipxe: bool
    guid: str | None

    def __init__(self, mac: str, arch: int | None = None, firmware: Firmware = Firmware.UNKNOWN, ipxe: bool = False,
                 guid: str | None = None) -> None:
        self.mac = mac
        self.arch = arch
        self.firmware = firmware
        self.ipxe = ipxe
        self.guid = guid

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Machine):
            return NotImplemented
        return (self.mac == other.mac and self.arch == other.arch and self.firmware == other.firmware
                and self.ipxe == other.ipxe and self.guid == other.guid)


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    capsule: str | None = None
    kernel_args: str = ""
    description: str = ""
    vars: dict[str, str] = field(default_factory=dict)  # inherited by the group's nodes (a node's own win)


# init=False: a hand-written __init__ compiles (tools/compile.py, mypyc), several times faster than the dataclass's
# generated one, which stays interpreted; one Node per first contact and per registry read on the DHCP path. Fields
# are set with object.__setattr__, which mypyc turns into a plain store and the sources (frozen enforced) accept.
@dataclass(frozen=True, slots=True, init=False)
class Node:
    mac: str
    name: str
    group: str
    capsule: str | None
    enabled: bool
    approved: bool
    state: State
    reason: str
    state_since: float
    ip: str | None
    first_contact: float
    last_contact: float
    kernel_args: str
    vars: dict[str, str]
    server: str | None  # the bootd server that last gave it its address (several servers, one registry)

    def __init__(self, mac: str, name: str, group: str, capsule: str | None = None, enabled: bool = True,
                 approved: bool = True, state: State = State.DISCOVERED, reason: str = "", state_since: float = 0.0,
                 ip: str | None = None, first_contact: float = 0.0, last_contact: float = 0.0, kernel_args: str = "",
                 vars: dict[str, str] | None = None, server: str | None = None) -> None:
        object.__setattr__(self, "mac", mac)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "group", group)
        object.__setattr__(self, "capsule", capsule)
        object.__setattr__(self, "enabled", enabled)
        object.__setattr__(self, "approved", approved)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "state_since", state_since)
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "first_contact", first_contact)
        object.__setattr__(self, "last_contact", last_contact)
        object.__setattr__(self, "kernel_args", kernel_args)
        object.__setattr__(self, "vars", {} if vars is None else vars)
        object.__setattr__(self, "server", server)


def node_json(node: Node) -> dict[str, Any]:
    """A node as JSON values: the one shape the HTTP API and ``bootd node ... --json`` both print."""
    out = asdict(node)
    out["state"] = node.state.value
    return out


@dataclass(frozen=True, slots=True, init=False)  # init=False: as Node (one per ACK)
class Lease:
    ip: str
    mac: str
    expires: float
    hostname: str | None

    def __init__(self, ip: str, mac: str, expires: float, hostname: str | None = None) -> None:
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "mac", mac)
        object.__setattr__(self, "expires", expires)
        object.__setattr__(self, "hostname", hostname)


@dataclass(frozen=True, slots=True)
class BootPlan:
    """The answer to "what should this machine load next", decided by the boot service."""

    filename: str
    next_server: str | None = None
    ipxe_no_proxydhcp: bool = False

