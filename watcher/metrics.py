"""Prometheus metrics. Every metric lives on a :class:`Metrics` object bound to one
``CollectorRegistry`` (the daemon's own; tests make their own), all under ``NAMESPACE``.
docs/metrics.md describes each one; a test checks that every metric here is documented."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from prometheus_client import Metric

    from .store import Store

NAMESPACE = "watcher"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DETECTION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ns = NAMESPACE
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

        # chains and nodes
        self.chain_head = Gauge("chain_head_block", "Newest block number the node reports.", ["chain"], namespace=ns, registry=r)
        self.chain_scanned = Gauge("chain_scanned_block", "Newest block watcher has scanned and linked by hash.", ["chain"], namespace=ns, registry=r)
        self.chain_lag = Gauge("chain_lag_blocks", "Node head minus scanned block.", ["chain"], namespace=ns, registry=r)
        self.chain_up = Gauge("chain_node_up", "1 if the chain's node answered the last poll, else 0.", ["chain"], namespace=ns, registry=r)
        self.node_up = Gauge("node_up", "1 if this node of the chain answers and is within max_lag of the best head, else 0.", ["chain", "node"], namespace=ns, registry=r)
        self.node_head = Gauge("node_head_block", "The head this node of the chain last reported.", ["chain", "node"], namespace=ns, registry=r)
        self.node_active = Gauge("node_active", "1 for the node of the chain that requests go to now.", ["chain", "node"], namespace=ns, registry=r)
        self.node_switches = Counter("node_switches_total", "Times requests moved to another node of the chain.", ["chain"], namespace=ns, registry=r)
        self.push_connected = Gauge("push_connected", "1 while the node's head subscription (ws_url) is up.", ["chain", "node"], namespace=ns, registry=r)
        self.push_heads = Counter("push_heads_total", "New heads the node pushed over its subscription.", ["chain", "node"], namespace=ns, registry=r)
        self.chain_halted = Gauge("chain_halted", "1 if scanning of the chain stopped and needs an operator (e.g. a reorg deeper than the finality depth).", ["chain"], namespace=ns, registry=r)
        self.blocks_scanned = Counter("blocks_scanned_total", "Blocks scanned.", ["chain"], namespace=ns, registry=r)
        self.rpc_requests = Counter("rpc_requests_total", "JSON-RPC calls sent to nodes (each call of a batch counts).", ["chain", "method"], namespace=ns, registry=r)
        self.rpc_errors = Counter("rpc_errors_total", "Failed JSON-RPC exchanges, by kind (timeout, connect, http, rpc, decode).", ["chain", "method", "kind"], namespace=ns, registry=r)
        self.rpc_latency = Histogram("rpc_latency_seconds", "Time per HTTP exchange with a node; method is the call or 'batch'.", ["chain", "method"], namespace=ns, registry=r, buckets=_LATENCY_BUCKETS)
        self.reorgs = Counter("reorgs_total", "Chain reorganisations handled.", ["chain"], namespace=ns, registry=r)
        self.reorg_depth = Histogram("reorg_depth_blocks", "Depth of handled reorganisations (blocks rolled back).", ["chain"], namespace=ns, registry=r, buckets=(1, 2, 3, 5, 10, 20, 50, 100))

        # transfers
        self.transfers = Counter("transfers_total", "Transfer state changes, by the new status.", ["chain", "asset", "status"], namespace=ns, registry=r)
        self.received = Counter("received_base_units_total", "Confirmed volume received, in the asset's base units (divide by 10^decimals).", ["chain", "asset"], namespace=ns, registry=r)
        self.detection_latency = Histogram("detection_latency_seconds", "Block timestamp to transfer.detected event written.", ["chain"], namespace=ns, registry=r, buckets=_DETECTION_BUCKETS)
        self.received_units = Counter("received_total", "Confirmed volume received, in asset units (a float: for dashboards, never for accounting).", ["chain", "asset"], namespace=ns, registry=r)
        self.watched_addresses = Gauge("watched_addresses", "Addresses watched per chain.", ["chain"], namespace=ns, registry=r)

        # webhooks
        self.webhook_attempts = Counter("webhook_attempts_total", "Webhook delivery attempts, by result (success, http_error, network_error).", ["result"], namespace=ns, registry=r)
        self.webhook_deliveries = Counter("webhook_deliveries_total", "Webhook deliveries finished, by outcome (delivered, failed after the last retry).", ["outcome"], namespace=ns, registry=r)
        self.webhook_latency = Histogram("webhook_attempt_seconds", "Time per delivery attempt (request to response).", namespace=ns, registry=r, buckets=_LATENCY_BUCKETS)
        self.webhook_delivery_delay = Histogram("webhook_delivery_delay_seconds", "Event written to successful delivery (includes retries).", namespace=ns, registry=r, buckets=_DETECTION_BUCKETS)

        # money out
        self.payouts_blocked = Gauge("payouts_blocked", "Pending payouts that cannot be sent right now (e.g. the hot wallet lacks funds).", ["chain"], namespace=ns, registry=r)
        self.hot_wallet_balance = Gauge("hot_wallet_balance", "Hot wallet balance in asset units (a float: for dashboards and alerts, never for accounting).", ["chain", "asset"], namespace=ns, registry=r)

        # the API: by principal id (key_... or config:<name>: never a secret) and outcome
        self.api_requests = Counter("api_requests_total", "API requests that authenticated, by key id and result (ok, or the refusal's code).", ["key", "result"], namespace=ns, registry=r)
        self.api_refusals = Counter("api_refusals_total", "API requests refused before a handler ran, by key id ('' when none authenticated) and reason.", ["key", "reason"], namespace=ns, registry=r)

        # events, errors
        self.events = Counter("events_total", "Events written to the outbox, by type.", ["type"], namespace=ns, registry=r)
        self.storage_errors = Counter("storage_errors_total", "Database writes that failed for a storage reason and were retried, by kind (locked, full, io).", ["kind"], namespace=ns, registry=r)
        self.errors = Counter("errors_total", "Errors handled by the daemon, by where they happened.", ["kind"], namespace=ns, registry=r)
        self.build_info = Gauge("build_info", "Always 1; the version label says which watcher runs.", ["version"], namespace=ns, registry=r)
        from . import __version__

        self.build_info.labels(__version__).set(1)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: prometheus_client validates the values and takes a
        lock on every ``labels()`` (~6 µs), and a scan asks the same few children for every
        transfer, event and JSON-RPC call it makes (no child is ever removed here)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def watch_store(self, store: Store) -> None:
        """Add the gauges read from the database at scrape time."""
        self.registry.register(StoreCollector(store))


class StoreCollector:
    """Gauges read from the database at scrape time: work by status, the webhook backlog.
    Counting rows is cheap with the status indexes, and always right after a restart."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> list[Metric]:
        return []  # no descriptions up front: the registry then never collects at registration

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        counts = self.store.status_counts()
        for table, doc in (("invoices", "Invoices by chain and status."), ("payouts", "Payouts by chain and status."),
                           ("sweeps", "Sweeps by chain and status.")):
            g = GaugeMetricFamily(f"{NAMESPACE}_{table}", doc, labels=["chain", "status"])
            for chain, status, n in counts[table]:
                g.add_metric([chain, status], n)
            yield g
        for status, name, doc in (
            ("pending", "webhook_outbox_pending", "Webhook deliveries waiting to be sent or retried."),
            ("failed", "webhook_deliveries_failed", "Webhook deliveries that gave up after the last retry "
                                                    "(redeliver them)."),
        ):
            g = GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=["webhook"])
            for webhook_id, n in self.store.webhooks.deliveries_by_endpoint(status):
                g.add_metric([webhook_id], n)
            yield g
        yield GaugeMetricFamily(f"{NAMESPACE}_events_last_seq", "Sequence number of the newest event in the outbox.",
                                value=self.store.events.last_seq())
