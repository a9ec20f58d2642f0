"""The ``watcher`` command.

Exit codes: 0 success, 1 a runtime failure, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from . import __version__
from .errors import WatcherError

if TYPE_CHECKING:
    from .core import Core

DEFAULT_CONFIG = "watcher.toml"


def _config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("WATCHER_CONFIG") or DEFAULT_CONFIG


def _fail(message: str, code: int = 2) -> int:
    print(f"watcher: error: {message}", file=sys.stderr)
    return code


def _core(args: argparse.Namespace) -> Core:
    """The commands' way in: config, keys and database, checked and opened (``with``
    closes it); nothing is started."""
    from .core import Core

    return Core.open(_config_path(args))


def _leaf_error(exc: BaseException) -> BaseException:
    """The first non-group exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


# --- commands ------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from .keys import Keyring, new_mnemonic, write_secret_file

    target = Path(args.dir)
    cfg_path = target / "watcher.toml"
    seed_rel = "data/seed.txt"
    seed_path = target / seed_rel
    if cfg_path.exists():
        return _fail(f"{cfg_path} already exists; not overwriting it")
    keys: dict[str, Any]
    words = None
    if args.xpub:
        Keyring.from_xpub(args.xpub)  # validates, raises a clear KeyMaterialError
        keys = {"xpub": args.xpub}
    else:
        if seed_path.exists():
            return _fail(f"{seed_path} already exists; not overwriting a seed")
        words = new_mnemonic(args.words)
        write_secret_file(seed_path, words + "\n")
        keys = {"mnemonic_file": seed_rel}
    config = {
        "storage": {"path": "data/watcher.db"},
        "keys": keys,
        "api": {"listen": args.listen, "token": secrets.token_urlsafe(24)},
        "chains": [{
            "id": args.chain,
            "family": "evm",
            "rpc_url": args.rpc_url,
            "native_symbol": "ETH",
            "confirmations": args.confirmations,
        }],
    }
    target.mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the API token
    with os.fdopen(fd, "wb") as f:
        f.write(b"# watcher configuration; see watcher.toml.example for every key.\n")
        tomli_w.dump(config, f)
    print(f"wrote {cfg_path}")
    if words:
        print(f"wrote {seed_path} (mode 0600)")
        print()
        print("Your recovery words (shown once; write them down and keep them offline):")
        print()
        for i, w in enumerate(words.split(), 1):
            print(f"  {i:2}. {w}")
        print()
        print("Every deposit address is m/44'/60'/0'/0/i of these words.")
    else:
        print("watch-only setup: deposits are watched, sweeps and payouts are unavailable")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import load_config
    from .keys import Keyring
    from .plugins import chain_families, make_plugin_manager

    config = load_config(_config_path(args), chain_families(make_plugin_manager()))
    Keyring.from_config(config.keys)
    print(f"{_config_path(args)}: OK ({len(config.chains)} chain(s): {', '.join(c.id for c in config.chains)})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from .daemon import Daemon, run_until_signal
    from .log import setup_logging

    daemon = Daemon.open(_config_path(args))
    setup_logging(args.log_level or daemon.config.log.level, daemon.config.log.format)
    try:
        trio.run(run_until_signal, daemon)
    finally:
        daemon.close()
    return 0


def cmd_address_new(args: argparse.Namespace) -> int:
    with _core(args) as core:
        cfg = core.config.chain(args.chain)
        if cfg is None:
            return _fail(f"unknown chain {args.chain!r} (configured: {', '.join(c.id for c in core.config.chains)})")
        addr, created = core.store.addresses.deposit_address(cfg.id, args.label)
        shown = cfg.spec.display_address(addr.address)
        if args.json:
            print(json.dumps({"chain": cfg.id, "label": addr.label, "address": shown,
                              "derivation_index": addr.derivation_index, "created": created}))
        else:
            print(shown)
    return 0


def cmd_address_list(args: argparse.Namespace) -> int:
    with _core(args) as core:
        cfg = core.config.chain(args.chain)
        if cfg is None:
            return _fail(f"unknown chain {args.chain!r}")
        spec = cfg.spec
        after = ""
        while True:
            page = core.store.addresses.list(cfg.id, after=after, limit=1000)
            for a in page:
                idx = "" if a.derivation_index is None else str(a.derivation_index)
                print(f"{spec.display_address(a.address)}\t{a.kind}\t{idx}\t{a.label or ''}")
            if len(page) < 1000:
                break
            after = page[-1].address
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import print_report, status_report

    with _core(args) as core:
        report = status_report(core)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from .reconcile import as_json, reconcile

    with _core(args) as core:
        lines = reconcile(core)
    bad = [line for line in lines if line.status in ("mismatch", "node_error")]
    if args.json:
        print(json.dumps({"ok": not bad, "lines": as_json(lines)}, indent=2))
    else:
        for line in lines:
            if line.status == "ok" and not args.all:
                continue
            who = f" ({line.label})" if line.label else ""
            print(f"{line.status:10} {line.chain} {line.address}{who} {line.asset}: expected {line.expected}, "
                  f"on chain {line.actual if line.actual is not None else '?'}"
                  + (f", difference {line.difference}" if line.difference else ""))
        checked = sum(1 for line in lines if line.status == "ok")
        print(f"{checked} balance(s) match, {len(bad)} problem(s), "
              f"{sum(1 for line in lines if line.status == 'in_flight')} skipped (sweep in flight)")
    return 1 if bad else 0


def cmd_backup(args: argparse.Namespace) -> int:
    from .backup import backup
    from .config import load_config
    from .plugins import chain_families, make_plugin_manager

    config = load_config(_config_path(args), chain_families(make_plugin_manager()))
    size = backup(config.storage.path, Path(args.path), force=args.force)
    print(f"backed up {config.storage.path} to {args.path} ({size} bytes, integrity ok)")
    return 0


def cmd_pause(args: argparse.Namespace, *, paused: bool = True) -> int:
    from .policy import PAUSE_SCOPES

    with _core(args) as core:
        scopes = set(PAUSE_SCOPES) if args.scope == "all" else {args.scope}
        if not paused and scopes & core.config.paused:
            return _fail(f"{', '.join(sorted(scopes & core.config.paused))} paused by the config file "
                         "([admin] paused); edit it and restart")
        with core.store.db.transaction():
            now = core.store.set_paused(scopes, paused=paused)
            core.store.audit.record("cli", "admin.pause" if paused else "admin.resume", None,
                                    {"scopes": sorted(scopes)})
        print(f"paused: {', '.join(sorted(now)) or 'nothing'}")
        print("(a running daemon applies this within a few seconds)")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    return cmd_pause(args, paused=False)


# --- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="watcher", description="Self-hosted blockchain payment watcher.")
    p.add_argument("--version", action="version", version=f"watcher {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", help=f"config file (default: $WATCHER_CONFIG or {DEFAULT_CONFIG})")
        return sp

    sp = sub.add_parser("init", help="write a starter watcher.toml and a new seed")
    sp.add_argument("--dir", default=".", help="where to write watcher.toml and data/ (default: .)")
    sp.add_argument("--xpub", help="watch-only: an account xpub (m/44'/60'/0') instead of a new seed")
    sp.add_argument("--words", type=int, choices=(12, 24), default=24)
    sp.add_argument("--chain", default="devnet", help="id of the first chain (default: devnet)")
    sp.add_argument("--rpc-url", default="http://127.0.0.1:8545")
    sp.add_argument("--confirmations", type=int, default=2)
    sp.add_argument("--listen", default="127.0.0.1:8420")
    sp.set_defaults(fn=cmd_init)

    sp = with_config(sub.add_parser("run", help="run the daemon"))
    sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sp.set_defaults(fn=cmd_run)

    sp = with_config(sub.add_parser("check-config", help="check the config and keys, then exit"))
    sp.set_defaults(fn=cmd_check_config)

    sp = with_config(sub.add_parser("status", help="per chain: node, head, scanned, lag, pending work, hot wallet"))
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_status)

    sp = with_config(sub.add_parser("reconcile", help="compare expected balances with the chain; exit 1 on any difference"))
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--all", action="store_true", help="also list the balances that match")
    sp.set_defaults(fn=cmd_reconcile)

    sp = with_config(sub.add_parser("backup", help="a consistent copy of the live database (safe while running)"))
    sp.add_argument("path")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.set_defaults(fn=cmd_backup)

    for name, fn, text in (("pause", cmd_pause, "kill switch: hold payouts, sweeps or all (nothing is dropped)"),
                           ("resume", cmd_resume, "release what pause held")):
        sp = with_config(sub.add_parser(name, help=text))
        sp.add_argument("scope", choices=("payouts", "sweeps", "all"))
        sp.set_defaults(fn=fn)

    ap = sub.add_parser("address", help="deposit addresses")
    asub = ap.add_subparsers(dest="address_command", required=True, metavar="SUBCOMMAND")
    sp = with_config(asub.add_parser("new", help="print the deposit address of a label (created on first use)"))
    sp.add_argument("--chain", required=True)
    sp.add_argument("--label", required=True)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_address_new)
    sp = with_config(asub.add_parser("list", help="list watched addresses: address, kind, index, label"))
    sp.add_argument("--chain", required=True)
    sp.set_defaults(fn=cmd_address_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # the CLI boundary: our errors get a line, not a traceback
        leaf = _leaf_error(exc)
        if isinstance(leaf, WatcherError):
            from .errors import ChainMismatch, ConfigError, KeyMaterialError
            from .plugins import PluginError
            from .store import StorageError

            bad_setup = isinstance(leaf, ConfigError | KeyMaterialError | PluginError | StorageError | ChainMismatch)
            return _fail(leaf.message, 2 if bad_setup else 1)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
