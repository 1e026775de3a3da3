"""TOML configuration into frozen dataclasses, validated eagerly.

Why eager: an administrator restarting bootd at 3 a.m. must learn about a
typo from ``bootd check-config`` or the first log line, not from the first
node that happens to take the broken code path.  Every error names the file,
the key, the bad value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from bootd.errors import ConfigError

DEFAULT_PATH = "/etc/bootd/bootd.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
ROOT_MODES = ("tmpfs", "squashfs")  # boot.root and the boot.root variable of groups and nodes

T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path = Path("/var/lib/bootd")
    address: str = "127.0.0.1"
    interface: str | None = None
    log_level: str = "info"
    graceful_timeout: float = 10.0


@dataclass(frozen=True)
class RegistryConfig:
    auto_register: bool = True
    approve_first: bool = False
    name_pattern: str = "n{index:04d}"
    first_index: int = 0
    default_group: str = "default"
    stale_after: float = 90.0
    dead_after: float = 300.0
    pxe_timeout: float = 300.0
    evidence: str = "auto"
    evidence_window: float = 120.0
    credential_lifetime: float = 30 * 86400.0
    register_rate: float = 100.0
    register_burst: int = 1000
    max_nodes: int = 10000
    register_any_client: bool = False


@dataclass(frozen=True)
class SubnetConfig:
    """One subnet of full-mode DHCP (Kea's ``subnet4``): its pool and what its clients are told.

    ``next_server`` and ``public_url`` None mean this server's own (server.address, http.public_url):
    a relayed rack may reach the boot server by another address than the local segment does.
    """

    subnet: str  # CIDR, e.g. 10.78.1.0/24
    pool_start: str
    pool_end: str
    router: str | None = None
    dns: tuple[str, ...] = ()
    domain: str | None = None
    lease_time: int = 3600
    next_server: str | None = None
    public_url: str | None = None
    interface: str | None = None  # clients on this interface, unrelayed, get this subnet

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet).netmask)


@dataclass(frozen=True)
class DhcpConfig:
    enabled: bool = False
    mode: str = "full"
    listen: str = "0.0.0.0"
    interface: str | None = None
    port: int = 67
    client_port: int = 68
    proxy_port: int = 4011
    pool_start: str | None = None
    pool_end: str | None = None
    netmask: str = "255.255.255.0"
    router: str | None = None
    dns: tuple[str, ...] = ()
    domain: str | None = None
    lease_time: int = 3600
    queue_size: int = 1024
    offer_hold: float = 30.0  # seconds an offered address stays reserved for its client
    decline_hold: float = 600.0  # seconds a DECLINEd address (in use by someone unknown) is skipped
    subnets: tuple[SubnetConfig, ...] = ()  # [[dhcp.subnets]]: more subnets, reached through relays

    def all_subnets(self) -> tuple[SubnetConfig, ...]:
        """Every subnet served: the [dhcp] pool keys (if set) as the first, then [[dhcp.subnets]].

        The first one keeps the old single-pool meaning: the local segment (dhcp.interface).
        """
        if not self.pool_start or not self.pool_end:
            return self.subnets
        net = ipaddress.IPv4Network(f"{self.pool_start}/{self.netmask}", strict=False)
        first = SubnetConfig(subnet=str(net), pool_start=self.pool_start, pool_end=self.pool_end, router=self.router,
                             dns=self.dns, domain=self.domain, lease_time=self.lease_time)
        return (first, *self.subnets)


@dataclass(frozen=True)
class TftpConfig:
    enabled: bool = False
    listen: str = "0.0.0.0"
    port: int = 69
    root: Path = Path("/var/lib/bootd/tftp")
    nbp_dir: Path = Path("/usr/lib/ipxe")
    max_sessions: int = 1000
    timeout: float = 1.0
    retries: int = 5
    max_blksize: int = 65464
    max_windowsize: int = 64
    max_client_timeout: float = 5.0
    max_session_time: float = 120.0
    max_sessions_per_source: int = 8


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = True
    listen: str = "0.0.0.0"
    port: int = 8080
    public_url: str = ""
    max_bulk_streams: int = 64
    bulk_queue: int = 256
    retry_after: float = 2.0
    send_timeout: float = 30.0
    bulk_per_source: int = 8
    bulk_queue_per_source: int = 16
    trusted: tuple[str, ...] = ()
    max_connections: int = 8192
    max_connections_per_source: int = 64
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_header_bytes: int = 32768


@dataclass(frozen=True)
class AdminConfig:
    listen: str = "127.0.0.1"
    port: int = 8081
    tls_cert: Path | None = None
    tls_key: Path | None = None
    viewer: bool = True  # state_dir/viewer-token: the status page, read-only (wall screens)
    session_idle: float = 8 * 3600.0  # a status-page session ends after this long unused
    max_sessions: int = 256  # status-page sessions kept in memory; the least recently used goes first


@dataclass(frozen=True)
class BootConfig:
    bios_nbp: str = "undionly.kpxe"
    uefi_nbp: str = "snponly.efi"
    uefi_arm64_nbp: str = "snponly-arm64.efi"
    kernel_args: str = "console=ttyS0"
    stage1_dir: Path = Path("/var/lib/bootd/stage1")
    # Where else a node may fetch its boot files and chunks, in order, after this server: replicas'
    # public URLs, or plain HTTP servers with the same object routes (nodes verify every object anyway).
    sources: tuple[str, ...] = ()
    # How a node holds its root: "tmpfs" (the capsule unpacked into RAM) or "squashfs" (the version's
    # squashfs image kept compressed in RAM under an overlayfs); groups and nodes override it with the
    # variable boot.root.
    root: str = "tmpfs"


@dataclass(frozen=True)
class CapsuleConfig:
    dir: Path = Path("/var/lib/bootd/capsules")
    zstd_level: int = 3
    chunk_min: int = 256 * 1024
    chunk_avg: int = 1024 * 1024
    chunk_max: int = 4 * 1024 * 1024
    # "members": files of chunk_min bytes or more get chunks of their own (cheap metadata changes and inserts);
    # "stream": plain CDC over the archive, the cuts (and version ids) of imports before 2026-12.
    chunk_cut: str = "members"
    keep_versions: int = 5
    build_cache: Path = Path("/var/lib/bootd/build-cache")
    # Where the admin API may import from and read recipes in (absolute directories); none: refused.
    import_dirs: tuple[Path, ...] = ()
    upstream: str = ""  # another bootd to fetch missing manifests and chunks from ("": none)
    upstream_connections: int = 8
    upstream_timeout: float = 60.0
    image_chunk: int = 1024 * 1024  # bytes per chunk of a version's squashfs image (the last may be shorter)


@dataclass(frozen=True)
class StoreConfig:
    """Where the node registry lives: "" is SQLite at state_dir/bootd.sqlite (see bootd.store.factory)."""

    url: str = ""
    password_file: Path | None = None
    pool_size: int = 10
    connect_timeout: float = 10.0
    retry_for: float = 30.0


@dataclass(frozen=True)
class ClusterConfig:
    """Several bootd servers on one registry (PostgreSQL): this server's id and the heartbeat timing.

    ``id`` "" means server.address. A server whose heartbeat is older than ``takeover_after`` seconds
    is dead: the live servers split its clients among themselves.
    """

    id: str = ""
    heartbeat: float = 2.0
    takeover_after: float = 10.0


@dataclass(frozen=True)
class OverlayConfig:
    dir: Path = Path("/var/lib/bootd/overlays")
    uid_min: int = 1000
    uid_max: int = 59999
    password_hashes: bool = False
    authorized_keys: Path = Path("/root/.ssh/authorized_keys")
    # The master's accounts the "users" overlay syncs (another pair for a site that keeps them apart).
    passwd: Path = Path("/etc/passwd")
    group: Path = Path("/etc/group")
    shadow: Path = Path("/etc/shadow")


@dataclass(frozen=True)
class PowerConfig:
    """Power control through the nodes' BMCs (bootd.service.power)."""

    parallel: int = 32
    timeout: float = 10.0
    stagger: float = 0.0
    max_jobs: int = 4


@dataclass(frozen=True)
class Config:
    path: str = "<defaults>"
    server: ServerConfig = field(default_factory=ServerConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)
    tftp: TftpConfig = field(default_factory=TftpConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    capsule: CapsuleConfig = field(default_factory=CapsuleConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    power: PowerConfig = field(default_factory=PowerConfig)

    @property
    def db_path(self) -> Path:
        return self.server.state_dir / "bootd.sqlite"

    def as_dict(self) -> dict[str, Any]:
        """The effective configuration, for ``check-config`` and logs."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = {
                    k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(value).items()  # type: ignore[arg-type]
                }
            else:
                out[f.name] = value
        return out


class _Section:
    """Reads one TOML table, remembering which keys were consumed.

    Unknown keys are an error: a misspelt ``pool_strat`` silently ignored
    would leave a cluster without addresses.
    """

    def __init__(self, path: str, name: str, data: Any) -> None:
        self.file = path
        self.name = name
        if not isinstance(data, Mapping):
            raise ConfigError(path, name, f"must be a table, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data
        self.used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(key), message)

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: T, what: str) -> T:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML integers are acceptable where a float is expected; bools are not ints here.
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"{value!r} is not valid; expected {what}")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise self.error(key, f"{value!r} is not valid; expected {what}")
        return value  # type: ignore[return-value]

    def flag(self, key: str, default: bool) -> bool:
        return self.get(key, bool, default, "true or false")

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.get(key, int, default, f"an integer from {lo} to {hi}")
        if not lo <= value <= hi:
            raise self.error(key, f"{value!r} is out of range; expected an integer from {lo} to {hi}")
        return value

    def port(self, key: str, default: int) -> int:
        return self.integer(key, default, 0, 65535)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.get(key, float, default, f"a number from {lo:g} to {hi:g}")
        if not lo <= value <= hi:
            raise self.error(key, f"{value!r} is out of range; expected a number from {lo:g} to {hi:g}")
        return value

    def text(self, key: str, default: str, check: Callable[[str], None] | None = None) -> str:
        value = self.get(key, str, default, "a string")
        if check is not None and key in self.data:
            try:
                check(value)
            except ValueError as exc:
                raise self.error(key, f"{value!r} is not valid; {exc}") from None
        return value

    def opt_text(self, key: str, check: Callable[[str], None] | None = None) -> str | None:
        if key not in self.data:
            self.used.add(key)
            return None
        return self.text(key, "", check)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str, default, "one of " + ", ".join(choices))
        if value not in choices:
            raise self.error(key, f"{value!r} is not valid; expected one of: {', '.join(choices)}")
        return value

    def path(self, key: str, default: Path) -> Path:
        value = self.get(key, str, str(default), "a path")
        if not value:
            raise self.error(key, "must not be empty; expected a path")
        return Path(value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            valid = ", ".join(sorted(self.used))
            raise self.error(unknown[0], f"unknown key; valid keys in [{self.name}] are: {valid}")


def _ipv4(value: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError("expected an IPv4 address such as 10.0.0.1") from None


def _netmask(value: str) -> None:
    try:
        ipaddress.IPv4Network(f"0.0.0.0/{value}")
    except ValueError:
        raise ValueError("expected a netmask such as 255.255.255.0") from None


def _strings(section: _Section, key: str, what: str, check: Callable[[str], None]) -> list[str]:
    """A list of strings, each passed through ``check`` (its ValueError says why one is not valid)."""
    items = section.get(key, list, [], what)
    for item in items:
        if not isinstance(item, str):
            raise section.error(key, f"{item!r} is not valid; expected {what}")
        try:
            check(item)
        except ValueError as exc:
            raise section.error(key, f"{item!r} is not valid; {exc}") from None
    return items


def _addresses(section: _Section, key: str) -> tuple[str, ...]:
    """A list of IPv4 addresses (dns servers), each checked."""
    return tuple(_strings(section, key, "a list of IPv4 addresses", _ipv4))


def _subnets(d: _Section, *, dns: tuple[str, ...], domain: str | None, lease_time: int,
             ) -> tuple[SubnetConfig, ...]:
    """[[dhcp.subnets]]: each a table; dns, domain and lease_time default to the [dhcp] values (as Kea's
    global parameters do). Errors name the entry, e.g. dhcp.subnets[1].pool_end."""
    items = d.get("subnets", list, [], "a list of tables ([[dhcp.subnets]] with subnet, pool_start, pool_end, ...)")
    out = []
    for i, item in enumerate(items):
        s = _Section(d.file, f"{d.name}.subnets[{i}]", item)
        cidr = s.text("subnet", "", _cidr)
        if not cidr:
            raise s.error("subnet", "is required; expected a network such as \"10.78.1.0/24\"")
        net = ipaddress.IPv4Network(cidr, strict=False)
        start, end = s.opt_text("pool_start", _ipv4), s.opt_text("pool_end", _ipv4)
        for key, value in (("pool_start", start), ("pool_end", end)):
            if value is None:
                raise s.error(key, f"is required; expected an IPv4 address in {net}")
            if ipaddress.IPv4Address(value) not in net:
                raise s.error(key, f"{value!r} is not in the subnet {net}")
        assert start is not None and end is not None
        if ipaddress.IPv4Address(start) > ipaddress.IPv4Address(end):
            raise s.error("pool_end", f"{end!r} is below pool_start {start!r}")
        router = s.opt_text("router", _ipv4)
        if router is not None and ipaddress.IPv4Address(router) not in net:
            raise s.error("router", f"{router!r} is not in the subnet {net}: clients could not reach it")
        public_url = s.opt_text("public_url", _url)
        s.used.update(("dns", "domain"))
        out.append(SubnetConfig(
            subnet=str(net), pool_start=start, pool_end=end, router=router,
            dns=_addresses(s, "dns") if "dns" in s.data else dns,
            domain=s.opt_text("domain") if "domain" in s.data else domain,
            lease_time=s.integer("lease_time", lease_time, 60, 86400 * 365),
            next_server=s.opt_text("next_server", _ipv4),
            public_url=public_url.rstrip("/") if public_url else None,
            interface=s.opt_text("interface"),
        ))
        s.finish()
    return tuple(out)


def _no_overlap(d: _Section, subnets: tuple[SubnetConfig, ...]) -> None:
    """Two subnets that overlap would make the choice by giaddr ambiguous: refuse, naming both."""
    nets = [ipaddress.IPv4Network(s.subnet) for s in subnets]
    offset = 1 if d.data.get("pool_start") is not None else 0
    for i, a in enumerate(nets):
        for j in range(i):
            if a.overlaps(nets[j]):
                where = "subnets" if i >= offset else "pool_start"
                other = f"subnets[{j - offset}]" if j >= offset else "pool_start/netmask"
                raise d.error(where + (f"[{i - offset}].subnet" if i >= offset else ""),
                              f"{a} overlaps {nets[j]} ({d.name}.{other}); each subnet must be distinct")
    seen: dict[str, int] = {}
    for i, s in enumerate(subnets):
        if s.interface is not None:
            if s.interface in seen:
                raise d.error(f"subnets[{i - offset}].interface", f"{s.interface!r} is already the interface of "
                              f"another subnet; an interface has one local subnet")
            seen[s.interface] = i


def _cidr(value: str) -> None:
    try:
        ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        raise ValueError("expected an IPv4 network such as 10.78.1.0/24") from None
    if "/" not in value:
        raise ValueError("expected an IPv4 network with its prefix length, such as 10.78.1.0/24")


def _server_id(value: str) -> None:
    if not value or len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError("expected 1 to 64 letters, digits, '-', '_' or '.', e.g. boot1")


def _name_pattern(value: str) -> None:
    try:
        a, b = value.format(index=0), value.format(index=1)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"expected a Python format string using {{index}}, e.g. n{{index:04d}} ({exc})") from None
    if a == b:
        raise ValueError("must use {index}, e.g. n{index:04d}, or every node gets the same name")


def _url(value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")


def _http_url(value: str) -> None:
    """A peer's base URL: http://HOST[:PORT][/PREFIX], nothing after the path."""
    parts = urlsplit(value)
    if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("expected a base URL such as http://10.0.0.1:8080 (http, a host, no query)")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port ({exc})") from None


def _sources(section: _Section, key: str) -> tuple[str, ...]:
    """An ordered list of base URLs, each checked."""
    urls = _strings(section, key, "a list of base URLs such as [\"http://10.0.0.2:8080\"]", _http_url)
    return tuple(dict.fromkeys(u.rstrip("/") for u in urls))


def _store_url_problem(value: str) -> str:
    """Why ``value`` cannot be store.url ("" if it can); never quotes the value, which may hold a password."""
    if not value.startswith(("postgresql://", "postgres://", "sqlite:///")):
        return (f"scheme {value.partition(':')[0]!r} is not valid; expected postgresql://USER@HOST/DB?sslmode=..., "
                "sqlite:///ABSOLUTE/PATH, or no url (SQLite in server.state_dir)")
    userinfo = value.partition("://")[2].partition("/")[0].rpartition("@")[0]
    if ":" in userinfo or "password=" in value.partition("?")[2]:
        # Config files get printed (check-config), copied and read by many: the password goes elsewhere.
        return "holds a password; put it in store.password_file or $PGPASSWORD/~/.pgpass instead"
    return ""


def _networks(section: _Section, key: str) -> tuple[str, ...]:
    """A list of addresses or CIDR networks, each checked, in canonical form (e.g. 10.0.0.0/8)."""
    what = "a list of IP addresses or networks such as [\"10.0.0.5\", \"10.1.0.0/16\"]"
    items = section.get(key, list, [], what)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise section.error(key, f"{item!r} is not valid; expected {what}")
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise section.error(key, f"{item!r} is not valid; {exc}") from None
    return tuple(out)


def _dirs(section: _Section, key: str) -> tuple[Path, ...]:
    what = "a list of absolute directories such as [\"/srv/images\"]"
    items = section.get(key, list, [], what)
    for item in items:
        if not isinstance(item, str) or not item.startswith("/"):
            raise section.error(key, f"{item!r} is not valid; expected {what}")
    return tuple(Path(item) for item in items)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the configuration file.

    ``path`` defaults to ``$BOOTD_CONFIG``, then ``/etc/bootd/bootd.toml``.
    """
    if path is None:
        path = os.environ.get("BOOTD_CONFIG", DEFAULT_PATH)
    spath = str(path)
    try:
        with open(spath, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(spath, "-", "file not found (set -c PATH or $BOOTD_CONFIG)") from None
    except PermissionError:
        raise ConfigError(spath, "-", "permission denied reading the file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(spath, "-", f"not valid TOML: {exc}") from None
    return from_dict(data, spath)


def from_dict(data: Mapping[str, Any], path: str = "<dict>") -> Config:
    sections = ("server", "registry", "dhcp", "tftp", "http", "admin", "boot", "capsule", "store", "overlay",
                "cluster", "power")
    for name in data:
        if name not in sections:
            raise ConfigError(path, name, f"unknown section; valid sections are: {', '.join(sections)}")

    def section(name: str) -> _Section:
        return _Section(path, name, data.get(name, {}))

    s = section("server")
    state_dir = s.path("state_dir", ServerConfig.state_dir)
    server = ServerConfig(
        state_dir=state_dir,
        address=s.text("address", ServerConfig.address, _ipv4),
        interface=s.opt_text("interface"),
        log_level=s.choice("log_level", ServerConfig.log_level, LOG_LEVELS),
        graceful_timeout=s.number("graceful_timeout", ServerConfig.graceful_timeout, 0.1, 600.0),
    )
    s.finish()

    r = section("registry")
    registry = RegistryConfig(
        auto_register=r.flag("auto_register", RegistryConfig.auto_register),
        approve_first=r.flag("approve_first", RegistryConfig.approve_first),
        name_pattern=r.text("name_pattern", RegistryConfig.name_pattern, _name_pattern),
        first_index=r.integer("first_index", RegistryConfig.first_index, 0, 10**9),
        default_group=r.text("default_group", RegistryConfig.default_group),
        stale_after=r.number("stale_after", RegistryConfig.stale_after, 1.0, 86400.0 * 30),
        dead_after=r.number("dead_after", RegistryConfig.dead_after, 1.0, 86400.0 * 30),
        pxe_timeout=r.number("pxe_timeout", RegistryConfig.pxe_timeout, 0.0, 86400.0 * 30),
        evidence=r.choice("evidence", RegistryConfig.evidence, ("auto", "lease", "pxe", "none")),
        evidence_window=r.number("evidence_window", RegistryConfig.evidence_window, 5.0, 3600.0),
        credential_lifetime=r.number("credential_lifetime", RegistryConfig.credential_lifetime, 60.0,
                                     86400.0 * 3650),
        register_rate=r.number("register_rate", RegistryConfig.register_rate, 0.0, 1e6),
        register_burst=r.integer("register_burst", RegistryConfig.register_burst, 1, 1_000_000),
        max_nodes=r.integer("max_nodes", RegistryConfig.max_nodes, 0, 10_000_000),
        register_any_client=r.flag("register_any_client", RegistryConfig.register_any_client),
    )
    if registry.dead_after <= registry.stale_after:
        raise r.error("dead_after", f"{registry.dead_after:g} must be greater than stale_after "
                      f"({registry.stale_after:g})")
    r.finish()

    d = section("dhcp")
    dns = _addresses(d, "dns")
    D = DhcpConfig
    lease_time = d.integer("lease_time", D.lease_time, 60, 86400 * 365)
    domain = d.opt_text("domain")
    dhcp = DhcpConfig(
        enabled=d.flag("enabled", D.enabled),
        mode=d.choice("mode", D.mode, ("full", "proxy")),
        listen=d.text("listen", D.listen, _ipv4),
        interface=d.opt_text("interface") or server.interface,
        port=d.port("port", D.port),
        client_port=d.port("client_port", D.client_port),
        proxy_port=d.port("proxy_port", D.proxy_port),
        pool_start=d.opt_text("pool_start", _ipv4),
        pool_end=d.opt_text("pool_end", _ipv4),
        netmask=d.text("netmask", D.netmask, _netmask),
        router=d.opt_text("router", _ipv4),
        dns=dns,
        domain=domain,
        lease_time=lease_time,
        queue_size=d.integer("queue_size", D.queue_size, 1, 1_000_000),
        offer_hold=d.number("offer_hold", D.offer_hold, 1.0, 3600.0),
        decline_hold=d.number("decline_hold", D.decline_hold, 0.0, 86400.0 * 30),
        subnets=_subnets(d, dns=dns, domain=domain, lease_time=lease_time),
    )
    if (dhcp.pool_start is None) != (dhcp.pool_end is None):
        missing = "pool_end" if dhcp.pool_end is None else "pool_start"
        raise d.error(missing, "pool_start and pool_end go together: set both (the local subnet's pool) or neither")
    if dhcp.pool_start is not None and dhcp.pool_end is not None:
        if ipaddress.IPv4Address(dhcp.pool_start) > ipaddress.IPv4Address(dhcp.pool_end):
            raise d.error("pool_end", f"{dhcp.pool_end!r} is below pool_start {dhcp.pool_start!r}")
        net = ipaddress.IPv4Network(f"{dhcp.pool_start}/{dhcp.netmask}", strict=False)
        if ipaddress.IPv4Address(dhcp.pool_end) not in net:
            raise d.error("pool_end", f"{dhcp.pool_end!r} is not in pool_start's subnet {net} (netmask "
                          f"{dhcp.netmask}): the pool must be one range in one subnet")
    if dhcp.enabled and dhcp.mode == "full" and not dhcp.all_subnets():
        raise d.error("pool_start", "full mode needs pool_start and pool_end, or [[dhcp.subnets]] "
                      "(or set mode = \"proxy\")")
    _no_overlap(d, dhcp.all_subnets())
    d.finish()

    t = section("tftp")
    tftp = TftpConfig(
        enabled=t.flag("enabled", TftpConfig.enabled),
        listen=t.text("listen", TftpConfig.listen, _ipv4),
        port=t.port("port", TftpConfig.port),
        root=t.path("root", state_dir / "tftp"),
        nbp_dir=t.path("nbp_dir", TftpConfig.nbp_dir),
        max_sessions=t.integer("max_sessions", TftpConfig.max_sessions, 1, 100_000),
        timeout=t.number("timeout", TftpConfig.timeout, 0.05, 255.0),
        retries=t.integer("retries", TftpConfig.retries, 1, 100),
        max_blksize=t.integer("max_blksize", TftpConfig.max_blksize, 512, 65464),
        max_windowsize=t.integer("max_windowsize", TftpConfig.max_windowsize, 1, 65535),
        max_client_timeout=t.number("max_client_timeout", TftpConfig.max_client_timeout, 1.0, 255.0),
        max_session_time=t.number("max_session_time", TftpConfig.max_session_time, 1.0, 86400.0),
        max_sessions_per_source=t.integer("max_sessions_per_source", TftpConfig.max_sessions_per_source, 1,
                                          100_000),
    )
    t.finish()

    h = section("http")
    port = h.port("port", HttpConfig.port)
    public_url = h.text("public_url", "", _url).rstrip("/")
    http = HttpConfig(
        enabled=h.flag("enabled", HttpConfig.enabled),
        listen=h.text("listen", HttpConfig.listen, _ipv4),
        port=port,
        public_url=public_url or f"http://{server.address}:{port}",
        max_bulk_streams=h.integer("max_bulk_streams", HttpConfig.max_bulk_streams, 1, 100_000),
        bulk_queue=h.integer("bulk_queue", HttpConfig.bulk_queue, 0, 1_000_000),
        retry_after=h.number("retry_after", HttpConfig.retry_after, 0.1, 3600.0),
        send_timeout=h.number("send_timeout", HttpConfig.send_timeout, 0.1, 3600.0),
        bulk_per_source=h.integer("bulk_per_source", HttpConfig.bulk_per_source, 1, 100_000),
        bulk_queue_per_source=h.integer("bulk_queue_per_source", HttpConfig.bulk_queue_per_source, 0, 1_000_000),
        trusted=_networks(h, "trusted"),
        max_connections=h.integer("max_connections", HttpConfig.max_connections, 1, 1_000_000),
        max_connections_per_source=h.integer("max_connections_per_source", HttpConfig.max_connections_per_source,
                                             1, 1_000_000),
        header_timeout=h.number("header_timeout", HttpConfig.header_timeout, 0.1, 3600.0),
        idle_timeout=h.number("idle_timeout", HttpConfig.idle_timeout, 0.1, 86400.0),
        max_header_bytes=h.integer("max_header_bytes", HttpConfig.max_header_bytes, 1024, 1 << 20),
    )
    h.finish()

    a = section("admin")
    cert, key = a.opt_text("tls_cert"), a.opt_text("tls_key")
    if (cert is None) != (key is None):
        raise a.error("tls_cert" if cert is None else "tls_key",
                      "tls_cert and tls_key go together: set both or neither")
    admin = AdminConfig(
        listen=a.text("listen", AdminConfig.listen, _ipv4),
        port=a.port("port", AdminConfig.port),
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
        viewer=a.flag("viewer", AdminConfig.viewer),
        session_idle=a.number("session_idle", AdminConfig.session_idle, 60.0, 30 * 86400.0),
        max_sessions=a.integer("max_sessions", AdminConfig.max_sessions, 1, 100_000),
    )
    a.finish()

    b = section("boot")
    boot = BootConfig(
        bios_nbp=b.text("bios_nbp", BootConfig.bios_nbp),
        uefi_nbp=b.text("uefi_nbp", BootConfig.uefi_nbp),
        uefi_arm64_nbp=b.text("uefi_arm64_nbp", BootConfig.uefi_arm64_nbp),
        kernel_args=b.text("kernel_args", BootConfig.kernel_args),
        stage1_dir=b.path("stage1_dir", state_dir / "stage1"),
        sources=_sources(b, "sources"),
        root=b.choice("root", BootConfig.root, ROOT_MODES),
    )
    b.finish()

    c = section("capsule")
    capsule = CapsuleConfig(
        dir=c.path("dir", state_dir / "capsules"),
        zstd_level=c.integer("zstd_level", CapsuleConfig.zstd_level, 1, 19),
        chunk_min=c.integer("chunk_min", CapsuleConfig.chunk_min, 64, 64 * 1024 * 1024),
        chunk_avg=c.integer("chunk_avg", CapsuleConfig.chunk_avg, 256, 64 * 1024 * 1024),
        chunk_max=c.integer("chunk_max", CapsuleConfig.chunk_max, 1024, 256 * 1024 * 1024),
        chunk_cut=c.choice("chunk_cut", CapsuleConfig.chunk_cut, ("members", "stream")),
        keep_versions=c.integer("keep_versions", CapsuleConfig.keep_versions, 1, 10_000),
        build_cache=c.path("build_cache", state_dir / "build-cache"),
        import_dirs=_dirs(c, "import_dirs"),
        upstream=c.text("upstream", CapsuleConfig.upstream, lambda v: _http_url(v) if v else None).rstrip("/"),
        upstream_connections=c.integer("upstream_connections", CapsuleConfig.upstream_connections, 1, 1000),
        upstream_timeout=c.number("upstream_timeout", CapsuleConfig.upstream_timeout, 1.0, 3600.0),
        image_chunk=c.integer("image_chunk", CapsuleConfig.image_chunk, 64 * 1024, 64 * 1024 * 1024),
    )
    if not capsule.chunk_min < capsule.chunk_avg < capsule.chunk_max:
        raise c.error("chunk_avg", f"need chunk_min < chunk_avg < chunk_max, got {capsule.chunk_min} < "
                      f"{capsule.chunk_avg} < {capsule.chunk_max}")
    c.finish()

    st = section("store")
    password_file = st.opt_text("password_file")
    url = st.text("url", "")
    if url and _store_url_problem(url):
        raise st.error("url", _store_url_problem(url))
    store = StoreConfig(
        url=url,
        password_file=Path(password_file) if password_file else None,
        pool_size=st.integer("pool_size", StoreConfig.pool_size, 1, 1000),
        connect_timeout=st.number("connect_timeout", StoreConfig.connect_timeout, 0.5, 600.0),
        retry_for=st.number("retry_for", StoreConfig.retry_for, 0.0, 3600.0),
    )
    st.finish()

    o = section("overlay")
    overlay = OverlayConfig(
        dir=o.path("dir", state_dir / "overlays"),
        uid_min=o.integer("uid_min", OverlayConfig.uid_min, 0, 2**31 - 2),
        uid_max=o.integer("uid_max", OverlayConfig.uid_max, 0, 2**31 - 2),
        password_hashes=o.flag("password_hashes", OverlayConfig.password_hashes),
        authorized_keys=o.path("authorized_keys", OverlayConfig.authorized_keys),
        passwd=o.path("passwd", OverlayConfig.passwd),
        group=o.path("group", OverlayConfig.group),
        shadow=o.path("shadow", OverlayConfig.shadow),
    )
    if overlay.uid_max < overlay.uid_min:
        raise o.error("uid_max", f"{overlay.uid_max} is below uid_min {overlay.uid_min}")
    o.finish()

    cl = section("cluster")
    cluster = ClusterConfig(
        id=cl.text("id", server.address, _server_id),
        heartbeat=cl.number("heartbeat", ClusterConfig.heartbeat, 0.1, 60.0),
        takeover_after=cl.number("takeover_after", ClusterConfig.takeover_after, 0.5, 3600.0),
    )
    if cluster.takeover_after < 2 * cluster.heartbeat:
        raise cl.error("takeover_after", f"{cluster.takeover_after:g} must be at least twice heartbeat "
                       f"({cluster.heartbeat:g}): one late heartbeat must not look like a dead server")
    cl.finish()


    pw = section("power")
    power = PowerConfig(
        parallel=pw.integer("parallel", PowerConfig.parallel, 1, 1024),
        timeout=pw.number("timeout", PowerConfig.timeout, 1.0, 600.0),
        stagger=pw.number("stagger", PowerConfig.stagger, 0.0, 10_000.0),
        max_jobs=pw.integer("max_jobs", PowerConfig.max_jobs, 1, 64),
    )
    pw.finish()


    return Config(path=path, server=server, registry=registry, dhcp=dhcp, tftp=tftp, http=http, admin=admin,
                  boot=boot, capsule=capsule, store=store, overlay=overlay, cluster=cluster, power=power)
