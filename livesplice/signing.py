"""Package signatures: Ed25519 (the `cryptography` library) over a package's SHA256SUMS.

SHA256SUMS lists a SHA-256 of every other member, so signing it signs the whole package. The
signature is the package member SIGNATURE, a small JSON object:

    {"format": 1, "algorithm": "ed25519", "key_id": "<64 hex>", "signature": "<base64>"}

The signed message is `SIGNED_PREFIX + SHA256SUMS` (a fixed prefix, so that a livesplice signature
can never be taken for a signature of anything else). A key's id is the SHA-256 of its raw 32-byte
public key, in hex.

Keys use standard formats: a private key is PEM (PKCS#8, what `keygen` writes and
`openssl genpkey -algorithm ed25519` makes) or OpenSSH (`ssh-keygen -t ed25519`), unencrypted; a
public key is PEM (SubjectPublicKeyInfo) or an OpenSSH `ssh-ed25519 AAAA... comment` line.

Trusted keys: every regular file not starting with "." in the trusted-keys directory
(`$LIVESPLICE_TRUSTED_KEYS`, else /etc/livesplice/trusted-keys) is one public key. Once that
directory holds a key, a package must be signed by one of them: an unsigned or wrongly signed one is
refused (exit 3). With no directory, or an empty one, signatures are not required.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInput, Refused

# cryptography is imported where a key is used: reading an unsigned package on a machine without
# trusted keys (every apply there) needs none, and its import cost 0.3 s in an emulated guest.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SIGNATURE_FORMAT = 1
SIGNED_PREFIX = b"livesplice package signature v1\n"
DEFAULT_TRUSTED_KEYS = Path("/etc/livesplice/trusted-keys")
TRUSTED_KEYS_ENV = "LIVESPLICE_TRUSTED_KEYS"
MAX_KEY_FILE = 16 * 1024  # bytes of one key file
MAX_TRUSTED_KEYS = 1000  # files in the trusted-keys directory

_KEY_ID = re.compile(r"[0-9a-f]{64}")


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()  # "the configured trusted-keys directory": $LIVESPLICE_TRUSTED_KEYS or /etc/...


def default_trusted_keys_dir() -> Path:
    return Path(os.environ.get(TRUSTED_KEYS_ENV) or DEFAULT_TRUSTED_KEYS)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# --- keys ---------------------------------------------------------------------------------------

def generate_key() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_openssh(key: Ed25519PrivateKey | Ed25519PublicKey, comment: str = "") -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode() if comment else b"") + b"\n"


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        if not path.is_file():
            raise BadInput(f"{what} {path} not found")
        if path.stat().st_size > MAX_KEY_FILE:
            raise BadInput(f"{what} {path}: larger than {MAX_KEY_FILE} bytes, not a key")
        return path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key in PEM (PKCS#8) or OpenSSH format."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    data = _read_key_file(path, "signing key")
    key: object
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BadInput(f"signing key {path} is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadInput(f"signing key {path}: not a PEM or OpenSSH private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"signing key {path}: not an Ed25519 key")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """An Ed25519 public key in PEM (SubjectPublicKeyInfo) or OpenSSH format."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    data = _read_key_file(path, "trusted key")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadInput(f"trusted key {path}: not a PEM or OpenSSH public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadInput(f"trusted key {path}: not an Ed25519 key")
    return key


@dataclass
class TrustedKeys:
    directory: Path | None
    keys: dict[str, Ed25519PublicKey]  # by key id

    @property
    def required(self) -> bool:
        """Whether packages must be signed: a trusted key is configured."""
        return bool(self.keys)


def load_trusted_keys(directory: Path | str | None | _Default = DEFAULT) -> TrustedKeys:
    """The trusted keys of `directory` (DEFAULT: the configured one; None: no keys). A missing
    directory holds no keys; a file in it that is not an Ed25519 public key is an error (exit 2),
    never silently skipped."""
    if directory is None:
        return TrustedKeys(None, {})
    directory = default_trusted_keys_dir() if isinstance(directory, _Default) else Path(directory)
    if not directory.exists():
        return TrustedKeys(directory, {})
    if not directory.is_dir():
        raise BadInput(f"trusted keys: {directory} is not a directory")
    try:
        entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise BadInput(f"trusted keys: cannot list {directory} ({exc.strerror or exc})") from None
    if len(entries) > MAX_TRUSTED_KEYS:
        raise BadInput(f"trusted keys: more than {MAX_TRUSTED_KEYS} files in {directory}")
    keys = {}
    for p in entries:
        if p.is_dir():
            continue
        key = load_public_key(p)
        keys[key_id(key)] = key
    return TrustedKeys(directory, keys)


# --- signatures ---------------------------------------------------------------------------------

@dataclass
class Signature:
    key_id: str
    signature: bytes  # 64 bytes of Ed25519 signature


def sign(sums: bytes, key: Ed25519PrivateKey) -> bytes:
    """The SIGNATURE member for a package whose SHA256SUMS is `sums`."""
    sig = key.sign(SIGNED_PREFIX + sums)
    return json.dumps({"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "key_id": key_id(key),
                       "signature": base64.b64encode(sig).decode()}, sort_keys=True).encode() + b"\n"


def parse_signature(data: bytes) -> Signature:
    """The SIGNATURE member's content; BadInput naming what is wrong if it is malformed."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadInput(f"SIGNATURE is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadInput("SIGNATURE: expected a JSON object")
    expected = {"format", "algorithm", "key_id", "signature"}
    if set(obj) != expected:
        raise BadInput(f"SIGNATURE: fields {sorted(map(str, obj))}, expected {sorted(expected)}")
    if obj["format"] != SIGNATURE_FORMAT or isinstance(obj["format"], bool):
        raise BadInput(f"SIGNATURE field format: {obj['format']!r}, this livesplice reads "
                       f"{SIGNATURE_FORMAT}")
    if obj["algorithm"] != "ed25519":
        raise BadInput(f"SIGNATURE field algorithm: {obj['algorithm']!r}, expected 'ed25519'")
    if not isinstance(obj["key_id"], str) or not _KEY_ID.fullmatch(obj["key_id"]):
        raise BadInput("SIGNATURE field key_id: expected 64 lowercase hex digits")
    try:
        if not isinstance(obj["signature"], str):
            raise ValueError
        sig = base64.b64decode(obj["signature"], validate=True)
    except (ValueError, binascii.Error):
        raise BadInput("SIGNATURE field signature: expected base64") from None
    if len(sig) != 64:
        raise BadInput(f"SIGNATURE field signature: {len(sig)} bytes, an Ed25519 signature has 64")
    return Signature(obj["key_id"], sig)


def verify(sums: bytes, signature: Signature | None, trusted: TrustedKeys, what: str) -> str | None:
    """Check a package's signature against the trusted keys. Returns the id of the trusted key that
    signed it; None when no key is configured (nothing required, nothing verified). Refused (exit 3)
    when a key is configured and the package is unsigned, signed by another key, or its signature
    does not verify (a changed member, or SHA256SUMS recomputed after a change)."""
    from cryptography.exceptions import InvalidSignature

    if not trusted.required:
        return None
    where = f"trusted keys in {trusted.directory}"
    if signature is None:
        raise Refused(f"{what} is not signed, and packages must be signed by one of the {where}")
    key = trusted.keys.get(signature.key_id)
    if key is None:
        raise Refused(f"{what} is signed by key {signature.key_id[:16]}, which is not one of the "
                      f"{where}")
    try:
        key.verify(signature.signature, SIGNED_PREFIX + sums)
    except InvalidSignature:
        raise Refused(f"{what}: its signature by key {signature.key_id[:16]} does not verify: "
                      "the package was changed after it was signed") from None
    return signature.key_id
