"""Encryption of secrets at rest (pre-shared keys in the store) with the server's key.

AES-256-GCM with a random 96-bit nonce per value; the associated data binds a
ciphertext to the object it belongs to, so it cannot be pasted into another
object. The key is 32 random bytes in <data-dir>/pki/secrets.key (0600), made
at the server's first start. A sealed value is text (it lives in a string
field of a protobuf message): "enc:v1:<key id>:<base64(nonce || ciphertext)>".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from policyagent.pki.ca import PkiError, private_dir, write_private

SECRETS_KEY = "secrets.key"
SEALED_PREFIX = "enc:v1:"


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


class SecretBox:
    """Seals and opens short secrets with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise PkiError("the secrets key must be 32 bytes")
        self._aead = AESGCM(key)
        # Names the key without revealing it: a store remembers which key sealed it.
        self.key_id = hashlib.sha256(b"policyagent secrets key id\x00" + key).hexdigest()[:16]

    @classmethod
    def load_or_create(cls, pki_dir: Path) -> SecretBox:
        """The key in `pki_dir`/secrets.key, made (0600) if absent."""
        private_dir(pki_dir)
        path = pki_dir / SECRETS_KEY
        if not path.exists():
            write_private(path, os.urandom(32))
        key = path.read_bytes()
        if len(key) != 32:
            raise PkiError(f"{path} is not a policyagent secrets key (it must hold 32 bytes)")
        return cls(key)

    def seal(self, plaintext: str, context: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{SEALED_PREFIX}{self.key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, value: str, context: str) -> str:
        """The plaintext of a sealed value; PkiError if it was sealed with another key or altered."""
        if not is_sealed(value):
            raise PkiError("the value is not sealed")
        key_id, _, body = value[len(SEALED_PREFIX) :].partition(":")
        if key_id != self.key_id:
            raise PkiError(f"the secret was sealed with another key ({key_id}, this server has {self.key_id})")
        try:
            raw = base64.b64decode(body, validate=True)
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except (InvalidTag, binascii.Error, ValueError) as exc:
            raise PkiError("a sealed secret does not decrypt (altered, or moved from another object)") from exc
