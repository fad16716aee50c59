"""Parquet files (LAION-style metadata, img2dataset's parquet output, ``Dataset.to_parquet``):
read with pyarrow one row group at a time, never as a whole table."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pyarrow.parquet as pq

from ..sourcefiles import open_regular
from ..storage import RemotePath
from .base import Location, Record, SourceSpec
from .columns import find_image_column, hf_features, table_errors, table_records

# Rows converted to Python at a time (pyarrow still reads whole row groups from the file).
_BATCH_ROWS = 1024


@contextlib.contextmanager
def open_parquet(path: Location) -> Iterator[pq.ParquetFile]:
    """A ParquetFile, or one line saying why ``path`` is not a readable one."""
    with table_errors(path, "Parquet file", "check the file or remove it from SOURCE"):
        handle = path.open("rb") if isinstance(path, RemotePath) else open_regular(path)
        with handle:
            yield pq.ParquetFile(handle)


def iter_records(spec: SourceSpec, caption_fields: tuple[str, ...]) -> Iterator[Record]:
    index = 0
    for path in spec.files:
        with open_parquet(path) as parquet:
            schema = parquet.schema_arrow
            image = find_image_column(schema, spec.image_column, hf_features(schema), path.name)
            root = spec.image_root or path.parent
            for record in table_records(parquet.iter_batches(batch_size=_BATCH_ROWS), image, path.name, root,
                                        caption_fields, index, spec.max_image_bytes):
                yield record
            index += parquet.metadata.num_rows


def check(spec: SourceSpec) -> None:
    """Fail before any model loads when the first file has no usable image column."""
    with open_parquet(spec.files[0]) as parquet:
        schema = parquet.schema_arrow
        find_image_column(schema, spec.image_column, hf_features(schema), spec.files[0].name)
