"""Errors that reach the user as one clear line (the CLI prints them and exits 2)."""


class ShardkitError(Exception):
    """A user-facing problem: bad path, unknown model, unreadable config or metadata."""


class SourceError(ShardkitError):
    """The dataset's metadata cannot be read; the message names the file and the line or index at fault."""


class ConfigError(ShardkitError):
    """A build option or preset is invalid."""


class ShardReadError(ShardkitError):
    """A shard could not be read or decoded and the policy is ``on_error="raise"``."""


class ShardFormatError(Exception):
    """A shard's content breaks the shard format (malformed tar header, missing member, bad array,
    split sample, a member larger than the format allows). Never retried."""


class ShardTruncatedError(EOFError):
    """A tar ends inside a member or before its end-of-archive blocks (cut short). An EOFError:
    for a remote shard it may be a dropped connection, so it is retried."""


class ShardIntegrityError(Exception):
    """A downloaded shard does not match the sha256 its manifest records."""
