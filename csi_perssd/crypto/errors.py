"""What can go wrong with keys and sealed objects. Messages never hold key material.

The edge maps them to CSI status codes (`to_csi`): a missing or malformed KEK is the caller's
input (INVALID_ARGUMENT), a KEK other than the one a data key is wrapped with is a state the
caller must fix (FAILED_PRECONDITION), an object failing authentication is DATA_LOSS."""
from __future__ import annotations


class CryptoError(ValueError):
    """Base class: the message is safe to log and to return (no key bytes, no plaintext)."""


class KeyMissing(CryptoError):
    """An encrypted volume needs a KEK and none was given (secret nor configuration)."""


class KeyMalformed(CryptoError):
    """The KEK given is not 32 bytes of base64."""


class WrongKey(CryptoError):
    """The KEK given is not the one the data key is wrapped with (key ids differ)."""


class Tampered(CryptoError):
    """A wrapped key, chunk or manifest fails authentication, or is truncated or malformed."""
