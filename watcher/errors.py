"""Every error watcher raises on purpose derives from :class:`WatcherError`.

Errors that reach an API client carry an HTTP ``status`` and a machine-readable ``code``;
the API turns them into ``{"error": {"code": ..., "message": ...}}``. Messages never contain
secrets: they name keys, ids and values the caller gave, nothing else.
"""

from __future__ import annotations


class WatcherError(Exception):
    """Root of watcher's own errors."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class ConfigError(WatcherError):
    """The configuration is wrong; ``key`` names the offending key path (``chains[0].rpc_url``)."""

    code = "config_error"

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


class KeyMaterialError(WatcherError):
    """Seed or xpub problems: unreadable seed file, bad words, missing private key (watch-only)."""

    code = "key_error"


class WatchOnlyError(KeyMaterialError):
    """A private key was needed but watcher runs from an xpub only."""

    status = 409
    code = "watch_only"


# --- client errors (4xx) -------------------------------------------------------------------


class BadRequest(WatcherError):
    """The request itself is wrong (shape, type, value)."""

    status = 400
    code = "bad_request"


class InvalidAddress(BadRequest):
    """Not an address of the chain's family, or a failed checksum."""

    code = "invalid_address"


class InvalidAmount(BadRequest):
    """Zero, negative, not a number, or more decimals than the asset has."""

    code = "invalid_amount"


class Unauthorized(WatcherError):
    """Missing or wrong bearer token."""

    status = 401
    code = "unauthorized"


class Forbidden(WatcherError):
    """The token is valid but may not do this."""

    status = 403
    code = "forbidden"


class TooManyRequests(WatcherError):
    """Over a rate limit; ``headers`` say when to come back (Retry-After, RateLimit-*)."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, headers: dict[str, str], code: str | None = None):
        super().__init__(message, code=code)
        self.headers = headers


class NotFound(WatcherError):
    """No such object (chain, asset, invoice, webhook, ...)."""

    status = 404
    code = "not_found"


class Conflict(WatcherError):
    """The request clashes with the current state (e.g. the same label on another address)."""

    status = 409
    code = "conflict"


# --- node / chain errors ---------------------------------------------------------------------


class NodeError(WatcherError):
    """Talking to a chain node failed. ``retryable`` says whether trying again may help;
    ``retry_after``: how long the node asked us to wait (seconds, its ``Retry-After``)."""

    status = 502
    code = "node_error"

    def __init__(self, message: str, *, retryable: bool = True, rpc_code: int | None = None,
                 retry_after: float | None = None, timed_out: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.rpc_code = rpc_code
        self.retry_after = retry_after
        self.timed_out = timed_out  # the node did not answer in time (a hung node)


class RpcError(NodeError):
    """The node answered with a JSON-RPC error object."""

    code = "rpc_error"


class ChainMismatch(WatcherError):
    """The node serves another chain than the config says (chain id differs)."""

    code = "chain_mismatch"


class DeepReorg(WatcherError):
    """The node's chain diverges from ours below the finality depth; scanning stops for that
    chain until an operator looks (this is never handled automatically)."""

    code = "deep_reorg"


class InconsistentData(NodeError):
    """The node returned data that does not fit together (a log whose block hash is not the
    block we fetched, a block that does not link to its parent inside one batch). The batch is
    fetched again; this is what a reorg during a fetch looks like."""

    code = "inconsistent_node_data"
