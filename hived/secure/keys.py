"""WireGuard key pairs made in memory (X25519, `cryptography`).

A `KeyPair` exists for one tunnel: made where it is used, its public half sent to the
key exchange service, its private half written only into the WireGuard interface (the
UAPI socket or netlink: memory to memory). The private key is never in repr/str, and
`wipe()` (also called when the object is dropped) overwrites this object's copy.

Wiping is best effort: `cryptography` keeps its own copy inside OpenSSL until its key
object is freed (which it is, with this object), and Python may have made short-lived
copies (the hex string for the UAPI). What this module guarantees is that nothing it
hands out by default contains the private key, and that it never writes it anywhere.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_LEN = 32


class BadKey(ValueError):
    """A key is not a WireGuard key (32 bytes; hex or base64 text of 32 bytes)."""


def public_from_text(text: str | bytes) -> bytes:
    """A public key given as raw 32 bytes, 64 hex digits or base64 (as `wg` prints it)."""
    if isinstance(text, bytes | bytearray):
        if len(text) != KEY_LEN:
            raise BadKey(f"a WireGuard key is {KEY_LEN} bytes, got {len(text)}")
        return bytes(text)
    s = text.strip()
    try:
        raw = bytes.fromhex(s) if len(s) == 2 * KEY_LEN else base64.b64decode(s, validate=True)
    except (ValueError, binascii.Error):
        raise BadKey("a WireGuard key is 32 bytes as 64 hex digits or 44 base64 characters") from None
    if len(raw) != KEY_LEN:
        raise BadKey(f"a WireGuard key is {KEY_LEN} bytes, got {len(raw)}")
    return raw


def b64(key: bytes) -> str:
    """Base64 of a key, as `wg` shows it (for humans and logs: public keys only)."""
    return base64.b64encode(key).decode()


class KeyPair:
    """One X25519 key pair. `public` is safe to show; the private half is reachable only
    through `private` / `private_hex()` (to configure an interface) and is wiped by `wipe()`."""

    __slots__ = ("_private", "public", "__weakref__")

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_LEN:
            raise BadKey(f"a WireGuard private key is {KEY_LEN} bytes, got {len(private)}")
        self._private = bytearray(private)
        pk = X25519PrivateKey.from_private_bytes(bytes(self._private))
        self.public: bytes = pk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> KeyPair:
        raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(raw)

    # -- the private half (only to configure an interface) ------------------------------------------
    @property
    def wiped(self) -> bool:
        return not self._private

    @property
    def private(self) -> bytes:
        if self.wiped:
            raise ValueError("this key pair was wiped: make a new one (keys are never reused)")
        return bytes(self._private)

    def private_hex(self) -> str:
        """For the UAPI `private_key=` line."""
        return self.private.hex()

    def wipe(self) -> None:
        """Overwrite this object's copy of the private key (best effort, see the module doc)."""
        buf = self._private
        for i in range(len(buf)):
            buf[i] = 0
        buf.clear()

    def __del__(self) -> None:
        try:
            self.wipe()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- the public half --------------------------------------------------------------------------------
    @property
    def public_hex(self) -> str:
        return self.public.hex()

    @property
    def public_b64(self) -> str:
        return b64(self.public)

    def __repr__(self) -> str:
        state = "wiped" if self.wiped else "live"
        return f"<KeyPair public={self.public_b64} private=<hidden, {state}>>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a KeyPair cannot be pickled or copied: its private key stays in this process")


def shared_check(a: KeyPair, b_public: bytes) -> bytes:
    """X25519(a.private, b_public): for tests that two ends agree. Not used by tunnels."""
    pk = X25519PrivateKey.from_private_bytes(a.private)
    return pk.exchange(X25519PublicKey.from_public_bytes(b_public))
