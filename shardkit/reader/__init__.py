"""The reader: shards -> the batches a PixArt-Σ training step takes.

Its stages, each usable alone, in the order data flows:

- ``store``: a build opened from anywhere (``resolve_build``), its shards read as tar samples
  with retries, a download cache and one policy for bad shards (``ShardStore``);
- ``epoch``: pure planning of which batches and shard pieces a rank's worker handles;
- ``stages``: decode (``SampleDecoder``), ``shuffled``, ``full_batches``;
- ``collate``: ``PixArtCollate``, the tensors of PixArt-Σ's batch;
- ``dataset``: ``ShardReader``, the torch ``IterableDataset`` made of them;
- ``wds``: ``WebDatasetStages``, decode and batching as stages of a stock webdataset pipeline.
"""

from ..errors import ShardFormatError, ShardIntegrityError, ShardReadError
from .collate import BatchBuffers, PixArtCollate
from .dataset import ShardReader
from .epoch import (PlannedBatch, ReaderPlan, ShardInfo, ShardPiece, batches_per_rank, count_batches, derive_seed,
                    epoch_batches, epoch_shard_order, mixed_epoch_batches, plan_builds, plan_reader, split_evenly)
from .stages import DecodedSample, SampleDecoder, choose_caption_field, full_batches, shuffled
from .store import BuildInfo, ReaderStats, ResolvedBuild, ShardStore, empty_caption, resolve_build
from .wds import WebDatasetStages

__all__ = ["BatchBuffers", "BuildInfo", "DecodedSample", "PixArtCollate", "PlannedBatch", "ReaderPlan", "ReaderStats",
           "ResolvedBuild", "SampleDecoder", "ShardFormatError", "ShardInfo", "ShardIntegrityError", "ShardPiece",
           "ShardReadError", "ShardReader", "ShardStore", "batches_per_rank", "choose_caption_field", "count_batches",
           "derive_seed", "empty_caption", "epoch_batches", "epoch_shard_order", "full_batches", "mixed_epoch_batches",
           "plan_builds", "plan_reader", "resolve_build", "shuffled", "split_evenly", "WebDatasetStages"]
