"""Durable key storage in a directory: one file per key.

A key's file name is ``k-`` followed by the key percent-encoded (every byte
outside ``[A-Za-z0-9_.~-]`` becomes ``%XX``), so any key maps to one safe
file name and back. Writes go to a temporary file in the same directory,
are fsynced, renamed over the old file, and the directory is fsynced, so a
crash leaves either the old or the new value, never a torn one.
"""

import os
import tempfile
from urllib.parse import quote, unquote

_PREFIX = "k-"
_TMP_PREFIX = "tmp-"
# Most file systems allow 255 bytes per name.
_MAX_NAME = 255


class InvalidKey(ValueError):
    """A key that cannot be stored (empty or too long once encoded)."""


def encode_key(key):
    if not isinstance(key, str) or key == "":
        raise InvalidKey("key must be a non-empty string")
    name = _PREFIX + quote(key, safe="")
    if len(name.encode("ascii")) > _MAX_NAME:
        raise InvalidKey("key too long (%d bytes encoded, at most %d)" % (len(name), _MAX_NAME))
    return name


def decode_name(name):
    """The key of a file name, or None if the file is not a key file."""
    if not name.startswith(_PREFIX):
        return None
    return unquote(name[len(_PREFIX):])


class KeyStore:
    """Keys and values (bytes) in ``data_dir``. Safe to use from threads."""

    def __init__(self, data_dir):
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self._remove_stale_temp_files()

    def _path(self, key):
        return os.path.join(self.data_dir, encode_key(key))

    def _remove_stale_temp_files(self):
        # Left behind by a crash between write and rename; never visible as keys.
        for name in os.listdir(self.data_dir):
            if name.startswith(_TMP_PREFIX):
                try:
                    os.unlink(os.path.join(self.data_dir, name))
                except FileNotFoundError:
                    pass

    def _fsync_dir(self):
        fd = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put(self, key, value):
        """Store ``value`` (bytes) under ``key`` durably. Returns True if the key is new."""
        path = self._path(key)
        existed = os.path.exists(path)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.data_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self._fsync_dir()
        return not existed

    def get(self, key):
        """The value of ``key`` (bytes), or None."""
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def has(self, key):
        return os.path.exists(self._path(key))

    def delete(self, key):
        """Remove ``key``. Returns True if it existed."""
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return False
        self._fsync_dir()
        return True

    def keys(self):
        """Every stored key, sorted."""
        out = []
        for name in os.listdir(self.data_dir):
            key = decode_name(name)
            if key is not None:
                out.append(key)
        out.sort()
        return out
