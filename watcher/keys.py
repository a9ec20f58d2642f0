"""Key material: the BIP39 seed (or, watch-only, an account xpub) and BIP44 derivation.

Deposit addresses are ``m/44'/coin'/0'/0/index`` so that every deposit can be recovered from
the seed in any standard wallet. Hot wallets (sweeps, payouts) use account 1. The seed words
and private keys stay inside this module's objects: they are never logged, never put in an
exception message, and ``repr`` hides them.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from bip_utils import (
    Bip32Slip10Secp256k1,
    Bip39Languages,
    Bip39MnemonicGenerator,
    Bip39MnemonicValidator,
    Bip39SeedGenerator,
    Bip39WordsNum,
)

from .config import KeysConfig
from .errors import KeyMaterialError, WatchOnlyError

log = logging.getLogger(__name__)

DEPOSIT_ACCOUNT = 0
HOT_WALLET_ACCOUNT = 1


def new_mnemonic(words: int = 24) -> str:
    """A fresh English BIP39 mnemonic from the OS's CSPRNG."""
    num = {12: Bip39WordsNum.WORDS_NUM_12, 24: Bip39WordsNum.WORDS_NUM_24}[words]
    return str(Bip39MnemonicGenerator(Bip39Languages.ENGLISH).FromWordsNumber(num))


def write_secret_file(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 (refusing to overwrite) and write ``text``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


class Keyring:
    """Derives public keys for every family, and private keys when it holds the seed."""

    def __init__(self, *, root: Bip32Slip10Secp256k1 | None, account_xpub: Bip32Slip10Secp256k1 | None):
        self._root = root
        self._xpub = account_xpub
        self._branch_cache: dict[tuple[int, int, int], Bip32Slip10Secp256k1] = {}

    def __repr__(self) -> str:
        return f"<Keyring {'watch-only' if self.watch_only else 'with seed'}>"

    @property
    def watch_only(self) -> bool:
        return self._root is None

    @classmethod
    def from_config(cls, cfg: KeysConfig) -> Keyring:
        if cfg.mnemonic_file is not None:
            words = _read_secret(cfg.mnemonic_file, "keys.mnemonic_file")
            passphrase = _read_secret(cfg.passphrase_file, "keys.passphrase_file") if cfg.passphrase_file else ""
            return cls.from_mnemonic(words, passphrase)
        assert cfg.xpub is not None
        return cls.from_xpub(cfg.xpub)

    @classmethod
    def from_mnemonic(cls, words: str, passphrase: str = "") -> Keyring:
        normalized = " ".join(words.split()).lower()
        try:
            ok = Bip39MnemonicValidator(Bip39Languages.ENGLISH).IsValid(normalized)
        except Exception:
            ok = False
        if not ok:
            # never echo the words: say only what is wrong with them
            raise KeyMaterialError(
                f"the seed is not a valid English BIP39 mnemonic ({len(normalized.split())} words; "
                "expected 12, 15, 18, 21 or 24 words with a valid checksum)"
            )
        seed = Bip39SeedGenerator(normalized, Bip39Languages.ENGLISH).Generate(passphrase)
        return cls(root=Bip32Slip10Secp256k1.FromSeed(seed), account_xpub=None)

    @classmethod
    def from_xpub(cls, xpub: str) -> Keyring:
        try:
            node = Bip32Slip10Secp256k1.FromExtendedKey(xpub)
        except Exception:
            raise KeyMaterialError("keys.xpub: not a valid extended public key") from None
        if not node.IsPublicOnly():
            raise KeyMaterialError("keys.xpub: this is an extended PRIVATE key; give the account xpub")
        if node.Depth().ToInt() != 3:
            raise KeyMaterialError(
                f"keys.xpub: expected an account-level xpub (depth 3, m/44'/60'/0'), got depth {node.Depth().ToInt()}"
            )
        return cls(root=None, account_xpub=node)

    def account_xpub(self, coin: int, account: int = DEPOSIT_ACCOUNT) -> str:
        """The account-level xpub (``m/44'/coin'/account'``), e.g. for a watch-only copy."""
        if self._root is None:
            if account != DEPOSIT_ACCOUNT:
                raise WatchOnlyError("watch-only: only the deposit account's xpub is known")
            assert self._xpub is not None
            return self._xpub.PublicKey().ToExtended()
        return self._root.DerivePath(f"m/44'/{coin}'/{account}'").PublicKey().ToExtended()

    def _branch(self, coin: int, account: int, change: int) -> Bip32Slip10Secp256k1:
        key = (coin, account, change)
        node = self._branch_cache.get(key)
        if node is None:
            if self._root is not None:
                node = self._root.DerivePath(f"m/44'/{coin}'/{account}'/{change}")
            elif account == DEPOSIT_ACCOUNT:
                assert self._xpub is not None
                node = self._xpub.ChildKey(change)
            else:
                raise WatchOnlyError(f"watch-only: account {account} cannot be derived from the deposit xpub")
            self._branch_cache[key] = node
        return node

    def public_key(self, coin: int, index: int, *, account: int = DEPOSIT_ACCOUNT, change: int = 0) -> bytes:
        """33-byte compressed public key at ``m/44'/coin'/account'/change/index``."""
        if not 0 <= index < 2**31:
            raise KeyMaterialError(f"derivation index {index} out of range")
        return self._branch(coin, account, change).ChildKey(index).PublicKey().RawCompressed().ToBytes()

    def private_key(self, coin: int, index: int, *, account: int = DEPOSIT_ACCOUNT, change: int = 0) -> bytes:
        """32-byte private key; raises :class:`WatchOnlyError` in watch-only mode."""
        if self._root is None:
            raise WatchOnlyError("watcher runs watch-only (xpub): private keys are not available")
        return self._branch(coin, account, change).ChildKey(index).PrivateKey().Raw().ToBytes()


def _read_secret(path: Path, key: str) -> str:
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise KeyMaterialError(f"{key}: cannot read {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:  # never echo the bytes: they may be key material
        raise KeyMaterialError(f"{key}: {str(path)!r} is not UTF-8 text") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s is readable by group or others (mode %o); chmod 600 it",
                    key, path, stat.S_IMODE(st.st_mode))
    if not text.strip() and key.endswith("mnemonic_file"):
        raise KeyMaterialError(f"{key}: {str(path)!r} is empty")
    return text.strip()
