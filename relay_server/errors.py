"""The server's error tree. Default message = the class docstring.

RelayError
 ├── ConfigError            settings that cannot work (missing key file, bad URL, ...)
 ├── CryptoError            a sealed record cannot be opened (wrong key, tampering, moved row)
 │    └── UnknownKeyError   the record names a key id the key ring does not hold
 ├── StorageError           the database failed (driver errors are wrapped, __cause__ kept)
 │    └── StorageUnavailable the database cannot be written right now (locked, full, gone)
 ├── NotFound               no such account / bucket / input / token / event / delivery
 ├── Conflict               the resource exists already or is in use
 └── AuthError              a credential was refused
      ├── PermissionDenied  a valid credential asked for something outside its scope
      └── Replay            a signed webhook already accepted came again
"""

from __future__ import annotations


class RelayError(Exception):
    """Stowhook server error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(RelayError):
    """The settings cannot work."""


class CryptoError(RelayError):
    """A sealed record could not be opened: wrong key, tampered data or a moved row."""


class UnknownKeyError(CryptoError):
    """The record was sealed with a key that is not in the key ring."""


class StorageError(RelayError):
    """The database failed."""


class StorageUnavailable(StorageError):
    """The database cannot be written right now."""


class NotFound(RelayError):
    """No such resource."""


class Conflict(RelayError):
    """The resource already exists or is in use."""


class AuthError(RelayError):
    """The credential was refused."""


class PermissionDenied(AuthError):
    """The credential does not grant access to this resource."""


class Replay(AuthError):
    """This signed webhook was accepted before: a replay is refused."""
