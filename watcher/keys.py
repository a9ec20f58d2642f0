"""Key material: the BIP39 seed (or, watch-only, account-level extended public keys) and
BIP32 derivation along each chain family's key scheme.

Every chain family declares its :class:`~watcher.chains.KeyScheme` (BIP43 purpose, SLIP-44
coin type, which account is the hot wallet): EVM chains use ``m/44'/60'/0'/0/i`` for deposit
addresses and ``m/44'/60'/1'/0/0`` for the hot wallet, so every deposit can be recovered from
the seed in any standard wallet. Watch-only mode takes account keys by path
(``[keys] accounts``; SLIP-132 ``ypub``/``zpub``/``vpub``/``Ltub``... versions are accepted and
read as the same key). The seed words and private keys stay inside this module's objects:
they are never logged, never put in an exception message, and ``repr`` hides them.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from bip_utils import (
    Base58Decoder,
    Base58Encoder,
    Bip32Slip10Secp256k1,
    Bip39Languages,
    Bip39MnemonicGenerator,
    Bip39MnemonicValidator,
    Bip39SeedGenerator,
    Bip39WordsNum,
)

from .chains import Account, ChainKeys, KeyScheme
from .config import KeysConfig
from .errors import KeyMaterialError, WatchOnlyError

if TYPE_CHECKING:
    # what bip-utils' constructors and derivations are declared to return (a
    # Bip32Slip10Secp256k1 here: every key watcher makes is secp256k1)
    from bip_utils.bip.bip32 import Bip32Base

log = logging.getLogger(__name__)

#: ``[keys] xpub = "..."`` is the shorthand for this account (the EVM deposit account, which
#: is what watcher's first releases derived from).
XPUB_SHORTHAND_ACCOUNT = "m/44'/60'/0'"
ACCOUNT_PATH_RE = re.compile(r"^m/(\d{1,9})'/(\d{1,9})'/(\d{1,9})'$")

# SLIP-132 version bytes of extended keys; every public one is read as a plain xpub (the
# version only tells a wallet which script type to use; the key and chain code are the same)
_PUBLIC_VERSIONS = {bytes.fromhex(v) for v in (
    "0488b21e", "049d7cb2", "04b24746", "0295b43f", "02aa7ed3",  # xpub ypub zpub Ypub Zpub
    "043587cf", "044a5262", "045f1cf6", "024289ef", "02575483",  # tpub upub vpub Upub Vpub
    "019da462", "01b26ef6", "0436f6e1",  # Ltub Mtub ttub (Litecoin)
)}
_PRIVATE_VERSIONS = {bytes.fromhex(v) for v in (
    "0488ade4", "049d7878", "04b2430c", "0295b005", "02aa7a99",  # xprv yprv zprv Yprv Zprv
    "04358394", "044a4e28", "045f18bc", "024285b5", "02575048",  # tprv uprv vprv Uprv Vprv
    "019d9cfe", "01b26792", "0436ef7d",  # Ltpv Mtpv ttpv
)}
_XPUB = bytes.fromhex("0488b21e")


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


def check_account_path(path: str) -> str | None:
    """A problem with an account path (``m/purpose'/coin'/account'``), or None."""
    if not ACCOUNT_PATH_RE.match(path):
        return f"{path!r} is not an account path such as \"m/84'/0'/0'\" (three hardened levels)"
    return None


def parse_account_key(text: str, where: str) -> Bip32Base:
    """An account-level extended public key (xpub, or any SLIP-132 variant such as zpub or
    vpub). Never echoes the text: it may be a private key pasted by mistake."""
    try:
        raw = Base58Decoder.CheckDecode(text.strip())
    except Exception:
        raise KeyMaterialError(f"{where}: not a valid extended public key") from None
    if len(raw) != 78:
        raise KeyMaterialError(f"{where}: not a valid extended public key")
    version = raw[:4]
    if version in _PRIVATE_VERSIONS:
        raise KeyMaterialError(f"{where}: this is an extended PRIVATE key; give the account's public key")
    if version not in _PUBLIC_VERSIONS:
        raise KeyMaterialError(f"{where}: not a valid extended public key (unknown version {version.hex()})")
    try:
        node = Bip32Slip10Secp256k1.FromExtendedKey(Base58Encoder.CheckEncode(_XPUB + raw[4:]))
    except Exception:
        raise KeyMaterialError(f"{where}: not a valid extended public key") from None
    if node.Depth().ToInt() != 3:
        raise KeyMaterialError(f"{where}: expected an account-level key (depth 3, e.g. m/44'/60'/0'), "
                               f"got depth {node.Depth().ToInt()}")
    return node


class Keyring:
    """Derives public keys along any account path, and private keys when it holds the seed."""

    def __init__(self, *, root: Bip32Base | None, accounts: Mapping[str, Bip32Base] = {}):
        self._root = root
        self._accounts = dict(accounts)
        self._branch_cache: dict[tuple[str, int], Bip32Base] = {}

    def __repr__(self) -> str:
        return f"<Keyring {'watch-only' if self.watch_only else 'with seed'}>"

    @property
    def watch_only(self) -> bool:
        return self._root is None

    @classmethod
    def from_config(cls, cfg: KeysConfig) -> Keyring:
        if cfg.mnemonic_file is not None:
            words = _read_secret(cfg.mnemonic_file, "keys.mnemonic_file")
            passphrase = _passphrase(cfg.passphrase_file) if cfg.passphrase_file else ""
            return cls.from_mnemonic(words, passphrase)
        accounts = {path: parse_account_key(key, f"keys.accounts.{path}") for path, key in cfg.accounts.items()}
        if cfg.xpub is not None:
            accounts[XPUB_SHORTHAND_ACCOUNT] = parse_account_key(cfg.xpub, "keys.xpub")
        return cls(root=None, accounts=accounts)

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
        return cls(root=Bip32Slip10Secp256k1.FromSeed(seed))

    @classmethod
    def from_xpub(cls, xpub: str, account: str = XPUB_SHORTHAND_ACCOUNT) -> Keyring:
        """Watch-only with one account key (``keys.xpub``)."""
        return cls(root=None, accounts={account: parse_account_key(xpub, "keys.xpub")})

    def has_account(self, account: str) -> bool:
        """Can public keys of this account be derived?"""
        return self._root is not None or account in self._accounts

    def account_xpub(self, account: str) -> str:
        """The account-level extended public key (e.g. of ``m/44'/60'/0'``) for a watch-only copy."""
        return self._account(account).PublicKey().ToExtended()

    def _account(self, account: str) -> Bip32Base:
        if self._root is not None:
            return self._root.DerivePath(account)
        node = self._accounts.get(account)
        if node is None:
            raise WatchOnlyError(f"watch-only: no key for account {account} (set keys.accounts)")
        return node

    def _branch(self, account: str, change: int) -> Bip32Base:
        key = (account, change)
        node = self._branch_cache.get(key)
        if node is None:
            node = self._account(account).ChildKey(change)
            self._branch_cache[key] = node
        return node

    def public_key(self, account: str, index: int, *, change: int = 0) -> bytes:
        """33-byte compressed public key at ``<account>/change/index``."""
        if not 0 <= index < 2**31:
            raise KeyMaterialError(f"derivation index {index} out of range")
        return self._branch(account, change).ChildKey(index).PublicKey().RawCompressed().ToBytes()

    def private_key(self, account: str, index: int, *, change: int = 0) -> bytes:
        """32-byte private key; raises :class:`WatchOnlyError` in watch-only mode."""
        if self._root is None:
            raise WatchOnlyError("watcher runs watch-only (account keys only): private keys are not available")
        return self._branch(account, change).ChildKey(index).PrivateKey().Raw().ToBytes()


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


def _passphrase(path: Path) -> str:
    """The BIP39 passphrase: the file's text less one final line break. BIP39 uses the
    passphrase exactly as given, so a space at either end changes every address; watcher
    once stripped them, so a file with one is refused rather than read another way than
    before (either reading could be the one the operator's other wallet uses)."""
    _read_secret(path, "keys.passphrase_file")  # the same checks and warnings
    text = path.read_text(encoding="utf-8")
    exact = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if exact != exact.strip():
        raise KeyMaterialError(f"keys.passphrase_file: {str(path)!r} has spaces or line breaks at its start or end; "
                               "BIP39 uses a passphrase exactly as given and watcher used to leave them out: remove "
                               "them from the file if that is the passphrase your addresses were derived with")
    return exact


class ChainKeyring(ChainKeys):
    """One chain's keys for its wallet: the seed's keys at the chain's scheme, and the
    private key of any address of ours (a derived deposit address, found by ``index_of``,
    or the hot wallet)."""

    def __init__(self, keyring: Keyring, scheme: KeyScheme, to_address: Callable[[bytes], str],
                 index_of: Callable[[str], int | None]):
        self.keyring = keyring
        self.scheme = scheme
        self._to_address = to_address
        self._index_of = index_of
        self.hot_address = None if keyring.watch_only else self.address("hot", 0, 0)

    def public_key(self, account: Account, change: int, index: int) -> bytes:
        return self.keyring.public_key(self.scheme.account_path(account), index, change=change)

    def address(self, account: Account, change: int, index: int) -> str:
        return self._to_address(self.public_key(account, change, index))

    def private_key(self, account: Account, change: int, index: int) -> bytes:
        return self.keyring.private_key(self.scheme.account_path(account), index, change=change)

    def private_key_for(self, address: str) -> bytes:
        if address == self.hot_address:
            return self.private_key("hot", 0, 0)
        index = self._index_of(address)
        if index is None:
            raise KeyMaterialError("not one of watcher's own addresses: no key to sign with")
        return self.private_key("deposit", 0, index)
