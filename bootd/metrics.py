"""Prometheus metrics shared by all transports.

One ``CollectorRegistry`` per daemon (not prometheus_client's global one) so
tests can run several bootd instances in one process and each ``/metrics``
shows only its own numbers.  The DHCP and TFTP servers register their own
counters on the same registry; ``/metrics`` serves all of them.
"""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bootd.model import Node, State


def make_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


class NodeStateGauge:
    """Nodes per lifecycle state, refreshed from the registry when scraped.

    Every state is always exported (0 when empty) so a dashboard's "dead"
    panel shows 0 rather than "no data" on a healthy cluster.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.gauge = Gauge("bootd_nodes", "Registered nodes by lifecycle state", ["state"], registry=registry)
        for state in State:
            self.gauge.labels(state=state.value).set(0)

    def update(self, nodes: Iterable[Node]) -> None:
        tally = _Tally(n.state.value for n in nodes)
        for state in State:
            self.gauge.labels(state=state.value).set(tally.get(state.value, 0))


class HttpMetrics:
    """Counters the HTTP transport moves; labelled by route template, never by raw path (cardinality)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "bootd_http_requests", "HTTP requests by route and status", ["route", "method", "status"],
            registry=registry,
        )
        self.bytes = Counter(
            "bootd_http_sent_bytes", "Response body bytes sent, by route", ["route"], registry=registry
        )
        self.open_file_cache = Counter(
            "bootd_http_open_file_cache", "Open-file cache lookups for served files", ["result"],
            registry=registry,
        )
        self.rejected = Counter(
            "bootd_http_bulk_rejected", "Bulk requests refused with 503 by admission control", registry=registry
        )
        self.aborted = Counter(
            "bootd_http_aborted", "Responses cut short because the client went away", registry=registry
        )
        self.corrupt = Counter(
            "bootd_http_corrupt_objects", "Content-addressed files refused because their bytes no longer match "
            "their sha256", registry=registry,
        )
        self.queue_wait = Histogram(
            "bootd_http_bulk_queue_wait_seconds", "Time bulk requests waited for a stream slot",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30), registry=registry,
        )
        self.outside_root = Counter(
            "bootd_http_outside_root", "File requests refused because the name leads outside its root (a symlink)",
            registry=registry,
        )
        self.registrations = Counter(
            "bootd_http_registrations", "Unknown MACs registered through the iPXE script route", registry=registry
        )
        self.node_events = Counter(
            "bootd_node_events", "Lifecycle events reported by nodes", ["event"], registry=registry
        )
        self.cache_hit = self.open_file_cache.labels(result="hit")
        self.cache_miss = self.open_file_cache.labels(result="miss")

    def bulk_gauges(self, registry: CollectorRegistry, active: Callable[[], int], queued: Callable[[], int]) -> None:
        Gauge("bootd_http_bulk_active", "Bulk streams in progress", registry=registry).set_function(
            lambda: float(active())
        )
        Gauge("bootd_http_bulk_queued", "Bulk requests waiting for a slot", registry=registry).set_function(
            lambda: float(queued())
        )


class TftpMetrics:
    """Counters the TFTP transport moves; ``tally()`` reads them back under the short names tests and
    bench/tftp use ("completed", "failed:timeout", "refused:busy", ...), so there is one set of numbers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter("bootd_tftp_transfers_started", "TFTP read transfers started", registry=registry)
        self.completed = Counter(
            "bootd_tftp_transfers_completed",
            "TFTP read transfers that ended normally (complete or size probe)",
            ["kind"],
            registry=registry,
        )
        self.failed = Counter(
            "bootd_tftp_transfers_failed", "TFTP read transfers that failed", ["reason"], registry=registry
        )
        self.bytes = Counter("bootd_tftp_sent_bytes", "File bytes sent over TFTP (no retransmits)", registry=registry)
        self.retransmits = Counter(
            "bootd_tftp_retransmits", "TFTP datagrams sent again after a timeout or gap", registry=registry
        )
        self.errors = Counter(
            "bootd_tftp_errors", "TFTP requests or packets refused, by reason", ["reason"], registry=registry
        )
        self.refused = Counter(
            "bootd_tftp_sessions_refused",
            "TFTP requests refused because of the session limit or resources",
            ["reason"],
            registry=registry,
        )
        self.duplicates = Counter(
            "bootd_tftp_duplicate_requests",
            "Read requests repeated before the transfer's first answer reached the client (ignored)",
            registry=registry,
        )
        self.active = Gauge("bootd_tftp_active_transfers", "TFTP transfers in progress", registry=registry)

    def tally(self) -> _Tally[str]:
        out: _Tally[str] = _Tally()
        named = {"complete": "completed", "size_probe": "size_probes"}
        for counter, prefix in (
            (self.started, "started"), (self.duplicates, "duplicate_requests"), (self.bytes, "bytes"),
            (self.retransmits, "retransmits"), (self.errors, "error:"), (self.refused, "refused:"),
            (self.failed, "failed:"), (self.completed, ""),
        ):
            for metric in counter.collect():
                for sample in metric.samples:
                    n = int(sample.value)
                    if not n or not sample.name.endswith("_total"):
                        continue
                    if "kind" in sample.labels:
                        out[named[sample.labels["kind"]]] += n
                    elif "reason" in sample.labels:
                        out[prefix + sample.labels["reason"]] += n
                        if prefix == "failed:":
                            out["failed"] += n
                    else:
                        out[prefix] += n
        return out


class DhcpMetrics:
    """What the DHCP transport counts: every datagram in, every reply out, every packet left unanswered
    (labelled by reason), and the queue depth."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter("bootd_dhcp_received", "DHCP datagrams received, by port", ["port"],
                                registry=registry)
        self.dropped = Counter("bootd_dhcp_dropped", "DHCP datagrams dropped or ignored without a reply, by reason",
                               ["reason"], registry=registry)
        self.replies = Counter("bootd_dhcp_replies", "DHCP replies sent, by message type", ["type"],
                               registry=registry)
        self.send_errors = Counter("bootd_dhcp_send_errors", "DHCP replies the kernel refused to send",
                                   registry=registry)
        self.queue = Gauge("bootd_dhcp_queue_depth", "DHCP datagrams waiting for a worker", registry=registry)


class HttpBoundsMetrics:
    """What the HTTP connection bounds refuse or close, by reason, and the connections open now.

    Reasons: ``max-connections``, ``max-connections-per-source`` (refused at accept),
    ``header-timeout``, ``header-too-large``, ``idle-timeout``, ``send-timeout`` (closed later).
    """

    def __init__(self, registry: CollectorRegistry, open_now: Callable[[], int]) -> None:
        self.refused = Counter(
            "bootd_http_connections_refused", "HTTP connections refused at accept, by reason", ["reason"],
            registry=registry,
        )
        self.closed = Counter(
            "bootd_http_connections_closed", "HTTP connections closed by a bound (timeout, size), by reason",
            ["reason"], registry=registry,
        )
        self.malformed = Counter(
            "bootd_http_malformed", "Malformed HTTP requests answered 400 and closed, by reason", ["reason"],
            registry=registry,
        )
        self.bulk_refused = Counter(
            "bootd_http_bulk_refused", "Bulk requests refused with 503, by which limit was full", ["reason"],
            registry=registry,
        )
        Gauge("bootd_http_connections", "HTTP connections open", registry=registry).set_function(
            lambda: float(open_now())
        )
