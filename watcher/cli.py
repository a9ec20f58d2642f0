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
#: What ``watcher init`` writes: small enough that a leaked key cannot drain a hot wallet.
INIT_LIMITS: dict[str, Any] = {
    "max_amount": {"ETH": "0.5"},
    "daily_limit": {"ETH": "2"},
    "approval_above": {"ETH": "0.1"},
    "label_daily_limit": {"ETH": "0.5"},
    "label_rate": "10/h",
    "payout_rate_limit": "20/h",
}


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
    # the secrets key seals webhook secrets and signed API keys; beside the config, apart
    # from the database in data/ (a copy of the database alone reveals no secret)
    from .secretbox import write_key_file

    secrets_key = target / "secrets.key"
    config = {
        "storage": {"path": "data/watcher.db"},
        "keys": {**keys, "secrets_key_file": "secrets.key"},
        "api": {"listen": args.listen, "token": secrets.token_urlsafe(32), "admin_token": secrets.token_urlsafe(32),
                "payout_rate_limit": INIT_LIMITS["payout_rate_limit"]},
        "chains": [{
            "id": args.chain,
            "family": "evm",
            "rpc_url": args.rpc_url,
            "native_symbol": "ETH",
            "confirmations": args.confirmations,
            # conservative money limits from the first start: a leaked key moves little, and
            # anything large waits for a person (raise them deliberately, per asset)
            "payouts": {k: v for k, v in INIT_LIMITS.items() if k != "payout_rate_limit"},
        }],
    }
    target.mkdir(parents=True, exist_ok=True)
    if not secrets_key.exists():
        write_key_file(secrets_key)
    fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the API token
    with os.fdopen(fd, "wb") as f:
        f.write(b"# watcher configuration; see watcher.toml.example for every key.\n")
        tomli_w.dump(config, f)
    print(f"wrote {cfg_path} (payouts: at most {INIT_LIMITS['max_amount']['ETH']} ETH each, "
          f"{INIT_LIMITS['daily_limit']['ETH']} ETH a day, above {INIT_LIMITS['approval_above']['ETH']} ETH "
          "only once approved with the admin token; raise them in [chains.payouts])")
    print(f"wrote {secrets_key} (mode 0600; keep it and a backup apart from the database)")
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
    from .plugins import chain_families, config_sections, invoice_links, make_plugin_manager

    pm = make_plugin_manager()
    config = load_config(_config_path(args), chain_families(pm), config_sections(pm))
    Keyring.from_config(config.keys)
    invoice_links(pm, config)
    print(f"{_config_path(args)}: OK ({len(config.chains)} chain(s): {', '.join(c.id for c in config.chains)})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from .daemon import Daemon, run_until_signal, tune_gc
    from .log import setup_logging

    daemon = Daemon.open(_config_path(args))
    setup_logging(args.log_level or daemon.config.log.level, daemon.config.log.format)
    tune_gc()
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
        from .labels import label_problem, normalize_label

        problem = label_problem(args.label)
        if problem is not None:
            return _fail(f"--label {problem}")
        addr, created = core.store.addresses.deposit_address(cfg.id, normalize_label(args.label))
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
    from .plugins import chain_families, config_sections, make_plugin_manager

    pm = make_plugin_manager()
    config = load_config(_config_path(args), chain_families(pm), config_sections(pm))
    size = backup(config.storage.path, Path(args.path), force=args.force)
    print(f"backed up {config.storage.path} to {args.path} ({size} bytes, integrity ok)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .backup import restore
    from .config import load_config
    from .plugins import chain_families, config_sections, make_plugin_manager

    pm = make_plugin_manager()
    config = load_config(_config_path(args), chain_families(pm), config_sections(pm))
    # not through Core: it must not open the database
    done = restore(Path(args.path), config.storage.path, carry=not args.no_carry)
    print(f"restored {args.path} to {config.storage.path} (integrity ok)")
    if done.carried:
        print("taken over from the database it replaces: " + ", ".join(
            f"{n} {table.replace('_', ' ')}" if table != "paused" else "the kill switch"
            for table, n in done.carried.items()))
    if done.skipped:
        print(f"warning: {done.skipped} address(es) of the replaced database clash with the backup's labels and "
              "were not taken over; they are in the database kept aside", file=sys.stderr)
    if done.aside:
        print(f"the previous database is kept as {', '.join(map(str, done.aside))}")
    print("start the daemon: it scans on from the backup's cursor and finds what happened since")
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


def cmd_keys_create(args: argparse.Namespace) -> int:
    from .auth import check_scopes, parse_rate

    try:
        scopes = check_scopes([x for x in args.scopes.split(",") if x.strip()])
        rate = parse_rate(args.rate_limit) if args.rate_limit else None
        payout_rate = parse_rate(args.payout_rate_limit) if args.payout_rate_limit else None
    except ValueError as e:
        return _fail(str(e))
    if args.expires is not None and not 1 <= args.expires <= 3650:
        return _fail("--expires is a number of days, 1-3650")
    with _core(args) as core:
        row, key = core.store.apikeys.create(name=args.name, scopes=scopes, signed=args.signed, rate_limit=rate,
                                             payout_rate_limit=payout_rate, expires_in_days=args.expires, actor=None)
        print("the key is shown this once; store it now (watcher keeps only its hash"
              + (", sealed with keys.secrets_key_file: this key signs requests, never send it)" if row.signed else ")"),
              file=sys.stderr)
        print(json.dumps({"id": row.id, "name": row.name, "key": key, "scopes": list(row.scopes),
                          "signed": row.signed}))
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _core(args) as core:
        now = core.store.clock.now_ms()
        rows = [r.public(now) for r in core.store.apikeys.list()]
        if args.json:
            print(json.dumps(rows))
            return 0
        for r in rows:
            limits = " ".join(f"{k}={r[k]}" for k in ("rate_limit", "payout_rate_limit") if r[k])
            print(f"{r['id']}\t{r['status']}\t{r['name']}\t{','.join(r['scopes'])}\t"
                  f"{'signed' if r['signed'] else 'bearer'}\t{r['expires_at'] or 'no expiry'}\t"
                  f"last used {r['last_used_at'] or 'never'}\t{limits}".rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _core(args) as core:
        row = core.store.apikeys.revoke(args.id, None)
        print(f"revoked {row.id} ({row.name}); a running daemon refuses it from its next request")
    return 0


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

    sp = with_config(sub.add_parser("restore", help="put a backup in place of the database (the daemon stopped); "
                                                    "the previous one is kept aside"))
    sp.add_argument("path", help="a file written by watcher backup")
    sp.add_argument("--no-carry", action="store_true",
                    help="do not take over the replaced database's addresses, keys, endpoints and kill switch "
                         "(only if it cannot be read: addresses handed out since the backup are then handed out "
                         "again)")
    sp.set_defaults(fn=cmd_restore)

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

    from .auth import SCOPES

    kp = sub.add_parser("keys", help="API keys (works while the daemon runs)")
    ksub = kp.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    sp = with_config(ksub.add_parser("create", help="create a key; its last output line is JSON with the key"))
    sp.add_argument("--name", required=True, help="what uses it, e.g. shop")
    sp.add_argument("--scopes", required=True, help=f"comma-separated: {','.join(SCOPES)}")
    sp.add_argument("--signed", action="store_true", help="requests are signed with the key (it never travels)")
    sp.add_argument("--rate-limit", help="requests per key: N/s, N/min, N/h (default: [api] rate_limit)")
    sp.add_argument("--payout-rate-limit", help="payouts per key: N/s, N/min, N/h (default: [api] payout_rate_limit)")
    sp.add_argument("--expires", type=int, metavar="DAYS", help="the key stops working after this many days")
    sp.set_defaults(fn=cmd_keys_create)
    sp = with_config(ksub.add_parser("list", help="every key: id, status, name, scopes, kind, expiry, last use"))
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_keys_list)
    sp = with_config(ksub.add_parser("revoke", help="revoke a key (a running daemon refuses it at once)"))
    sp.add_argument("id")
    sp.set_defaults(fn=cmd_keys_revoke)
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
