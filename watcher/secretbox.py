"""Secrets at rest: the few secrets watcher must be able to read back (webhook signing
secrets, the secrets of API keys that sign their requests) are sealed in the database with
AES-256-GCM under a key kept apart from it, in the file ``[keys] secrets_key_file``.

A copy of the database alone (a backup, a stolen disk image, a support bundle) then reveals
no secret; the key file is 32 random bytes, hex, mode 0600, written once by ``watcher init``
(or at the first start, where a config from before it has none). Losing it loses the
webhook secrets and signed API keys, not money: rotate the one, create the others again.

A sealed value is text, ``sealed:v1:<base64url(nonce | ciphertext | tag)>``, bound to what
it is for (the associated data, e.g. ``webhook:<endpoint id>``), so a sealed secret copied
into another row does not open there.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from pathlib import Path

from Crypto.Cipher import AES

from .errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "sealed:v1:"
_NONCE = 12
_TAG = 16


class SealError(ValueError):
    """A sealed value that does not open: another key, another row, or damaged."""


class SecretBox:
    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("a secrets key is 32 bytes")
        self._key = key

    def __repr__(self) -> str:  # never the key
        return "SecretBox(<key>)"

    def seal(self, plaintext: str, purpose: str) -> str:
        nonce = secrets.token_bytes(_NONCE)
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=nonce, mac_len=_TAG)
        cipher.update(purpose.encode())
        ct, tag = cipher.encrypt_and_digest(plaintext.encode())
        return PREFIX + base64.urlsafe_b64encode(nonce + ct + tag).decode().rstrip("=")

    def open(self, sealed: str, purpose: str) -> str:
        if not is_sealed(sealed):
            raise SealError("not a sealed value")
        body = sealed[len(PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise SealError("a sealed value that is not base64") from None
        if len(raw) < _NONCE + _TAG:
            raise SealError("a sealed value that is too short")
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=raw[:_NONCE], mac_len=_TAG)
        cipher.update(purpose.encode())
        try:
            return cipher.decrypt_and_verify(raw[_NONCE:-_TAG], raw[-_TAG:]).decode()
        except ValueError:
            raise SealError(f"a sealed {purpose.split(':')[0]} secret does not open with this secrets key "
                            "(another key file, or the value was changed)") from None


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


def write_key_file(path: Path) -> None:
    """A new key file (refuses to overwrite one: that would lose every sealed secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_bytes(32).hex() + "\n")


def load(path: Path, *, create: bool = True) -> SecretBox:
    """The box of the key file at ``path``; the file is created (0600) if it does not exist
    and ``create``. A file readable by others is used with a warning, like the seed file."""
    if not path.exists() and create:
        try:
            write_key_file(path)
            log.warning("created the secrets key file %s: keep it (and a backup) apart from the database", path)
        except FileExistsError:
            pass  # another process (the CLI, the daemon) made it first
        except OSError as e:
            raise ConfigError("keys.secrets_key_file", f"cannot create {str(path)!r}: {e.strerror or e}") from None
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not ASCII"
        raise ConfigError("keys.secrets_key_file", f"cannot read {str(path)!r}: {reason}") from None
    if mode & 0o077:
        log.warning("keys.secrets_key_file %s is readable by group or others (mode %o); chmod 600 it", path,
                    mode & 0o777)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError("keys.secrets_key_file", f"{str(path)!r} does not hold a secrets key (64 hex digits)")
    return SecretBox(key)
