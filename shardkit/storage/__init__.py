"""Where bytes live: local folders, http(s):// and object storage (s3:// and any fsspec URL).

- ``urls``: locations and their fsspec options, reading from anywhere with timeouts, and the one
  retry rule of every read and write (``Retry``: backoff with jitter; ``is_transient``);
- ``remote``: SOURCE files in object storage (``RemotePath``);
- ``output``: OUTPUT behind one ``Storage`` interface (local folder or whole-object uploads).
"""

from .output import FsspecStorage, LocalStorage, Storage, atomic_write_bytes, fsync_dir
from .remote import RemotePath, RemoteStat, as_location, universal_newlines
from .urls import (Retry, is_transient, is_url, join_url, local_path, open_read, parse_storage_options,
                   read_url_bytes, storage_error, storage_options_for, with_timeouts)

__all__ = ["FsspecStorage", "LocalStorage", "RemotePath", "RemoteStat", "Retry", "Storage", "as_location",
           "atomic_write_bytes", "fsync_dir", "is_transient", "is_url", "join_url", "local_path", "open_read",
           "parse_storage_options", "read_url_bytes", "storage_error", "storage_options_for", "universal_newlines", "with_timeouts"]
