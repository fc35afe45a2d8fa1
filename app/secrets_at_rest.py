"""Webhook signing secrets encrypted at rest with MultiFernet: the keys (WEBHOOK_SECRET_KEYS, else a key file made
once under VAR_DIR), and the column type that encrypts on the way into the database and decrypts on the way out, so
a dump of the database alone cannot sign events. Rotation: docs/operations.md ("Webhook secret encryption")."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import sqlalchemy as sa
import structlog
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.config import Settings

log = structlog.get_logger(__name__)

KEY_FILE_NAME = "webhook-secret.key"


class SecretBox:
    """Encrypts with the first key, decrypts with any of them."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one Fernet key is needed")
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            # Never the token itself: it is the encrypted secret.
            raise SecretKeyMismatch("a stored webhook secret cannot be decrypted with any of WEBHOOK_SECRET_KEYS "
                                    "(docs/operations.md, \"Webhook secret encryption\")") from exc

    def rotate(self, token: str) -> str:
        """The token re-encrypted with the first key (it may have been made with any of them)."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken as exc:
            raise SecretKeyMismatch("a stored webhook secret cannot be decrypted with any of WEBHOOK_SECRET_KEYS")\
                from exc


class SecretKeyMismatch(RuntimeError):
    """A stored secret was encrypted with a key that is no longer configured."""


def key_file(settings: Settings) -> Path:
    return settings.var_dir.resolve() / KEY_FILE_NAME


def load_box(settings: Settings) -> SecretBox:
    """The box for WEBHOOK_SECRET_KEYS; unset, for the key file under VAR_DIR, made (mode 0600) if missing."""
    if settings.webhook_secret_keys is not None:
        return SecretBox(settings.webhook_secret_key_list)
    path = key_file(settings)
    if not path.exists():
        _create_key_file(path)
        log.warning("webhook_secret_key_file_created", path=str(path))
    elif not settings.is_embedded:
        # Every API and worker process must read the same key: set WEBHOOK_SECRET_KEYS in a deployment of many hosts.
        log.info("webhook_secret_key_file_in_use", path=str(path))
    return SecretBox([path.read_bytes().strip()])


def _create_key_file(path: Path) -> None:
    """Write a new key where no process has yet: written aside, then linked into place, so two processes starting
    at once agree on one key (the second link fails and that process reads the first one's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=".webhook-secret-")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, Fernet.generate_key() + b"\n")
        os.fsync(fd)
        os.close(fd)
        with contextlib.suppress(FileExistsError):  # another process was first: its key stands
            os.link(scratch, path)
    finally:
        os.unlink(scratch)


_box: SecretBox | None = None


def configure(box: SecretBox) -> None:
    """Install the process's box (create_app does, from its settings), which EncryptedSecret uses."""
    global _box
    _box = box


def current_box() -> SecretBox:
    if _box is None:
        raise RuntimeError("webhook secrets are encrypted at rest: call app.secrets_at_rest.configure first")
    return _box


class EncryptedSecret(sa.TypeDecorator[str]):
    """A string column stored as a Fernet token: plaintext in Python, ciphertext in the database."""

    impl = sa.String(255)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        return None if value is None else current_box().encrypt(value)

    def process_result_value(self, value: str | None, dialect: sa.Dialect) -> str | None:
        return None if value is None else current_box().decrypt(value)
