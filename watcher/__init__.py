"""watcher: a self-hosted daemon that watches your own blockchain nodes for payments to
addresses it derives itself, confirms them, survives reorgs and reports every step to apps
through signed webhooks."""

__version__ = "0.1.0"
