"""Which shards of the plan are done, and the manifest written from that.

Whoever writes a shard (any rank, any Ray actor, a lone process) records it right after the
shard's commit: ``OUTPUT/.done/{H}x{W}-{index}.json`` holds the shard's manifest entry (or, for
a shard whose every record failed to decode, its skips). These records are the build's state:
a resume with any number of workers keeps the shards they list (when the file is there with the
listed size) and executes the rest.

``manifest.json`` is written from the records by whoever holds the manifest role (rank 0, the
Ray driver, a lone process) after every shard it learns of, and by every worker once its own
shards are done: the last one to finish writes the complete manifest. The manifest depends only
on the set of records, so it is the same whoever writes it; a writer that finds more records
after writing an unfinished manifest writes again, so a late writer never leaves a stale one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from .buckets import BucketTable
from .errors import ShardkitError
from .manifest import MANIFEST_NAME, Manifest, ShardEntry, read_manifest_at, write_failures, write_manifest
from .planfile import PLAN_NAME, BuildPlan, read_plan
from .storage import Storage

log = logging.getLogger(__name__)

DONE_DIR = ".done"


def _record_name(shard_name: str) -> str:
    """``shards/384x672-00003.tar`` -> ``.done/384x672-00003.json``."""
    return f"{DONE_DIR}/{shard_name.rsplit('/', 1)[-1][:-len('.tar')]}.json"


def record_shard(storage: Storage, entry: ShardEntry) -> None:
    """Say that a shard is committed, with its manifest entry; written by whoever wrote the shard."""
    _write_record(storage, entry.path, {"shard": asdict(entry)})


def record_empty(storage: Storage, shard_name: str, skipped: list[dict]) -> None:
    """Say that a shard is done without a file: every one of its records was skipped."""
    _write_record(storage, shard_name, {"empty": {"path": shard_name, "skipped": skipped}})


def _write_record(storage: Storage, shard_name: str, content: dict) -> None:
    payload = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"
    storage.write_atomic(_record_name(shard_name), payload.encode("utf-8"))


class Ledger:
    """The done records of one OUTPUT and its plan; ``publish()`` writes the manifest from them."""

    def __init__(self, storage: Storage, plan: BuildPlan, table: BucketTable, header: Manifest):
        self.storage = storage
        self.plan = plan
        self.names = [shard.name(table) for shard in plan.shards]  # by plan position
        self.header = header  # config, encoders, buckets: what every manifest of this build starts from
        self._read: dict[str, dict] = {}  # record file -> its content (records never change once written)

    # ---- reading ---------------------------------------------------------------------------
    def done(self) -> dict[int, dict]:
        """Plan position -> record, for every shard recorded whose file is there with its listed size."""
        listed = set(self.storage.listdir(DONE_DIR))
        wanted = {_record_name(name).rsplit("/", 1)[-1]: position for position, name in enumerate(self.names)}
        sizes = None
        done: dict[int, dict] = {}
        for file_name in sorted(listed & set(wanted)):
            content = self._content(f"{DONE_DIR}/{file_name}")
            if content is None:
                continue
            if "shard" in content:
                sizes = self.storage.list_sizes("shards") if sizes is None else sizes
                entry = content["shard"]
                if sizes.get(entry["path"].rsplit("/", 1)[-1]) != entry["bytes"]:
                    log.warning("shard %s is recorded as done but its file is missing or damaged; it will be rebuilt",
                                entry["path"])
                    self._read.pop(f"{DONE_DIR}/{file_name}", None)
                    continue
            done[wanted[file_name]] = content
        return done

    def _content(self, name: str) -> dict | None:
        if name not in self._read:
            try:
                content = json.loads(self.storage.read_bytes(name).decode("utf-8"))
            except FileNotFoundError:
                return None
            except (UnicodeDecodeError, ValueError):
                log.warning("%s is damaged; its shard will be rebuilt", self.storage.url_of(name))
                return None
            if not isinstance(content, dict) or not ({"shard", "empty"} & set(content)):
                log.warning("%s is not a shard record; its shard will be rebuilt", self.storage.url_of(name))
                return None
            self._read[name] = content
        return self._read[name]

    # ---- the manifest ----------------------------------------------------------------------
    def manifest(self, done: dict[int, dict]) -> Manifest:
        complete = len(done) == len(self.names)
        try:
            shards = [ShardEntry.from_json(r["shard"]) for r in done.values() if "shard" in r]
        except TypeError:
            raise ShardkitError(f"a record in {self.storage.url_of(DONE_DIR)} is not a shard entry; "
                                f"rebuild with --overwrite") from None
        return Manifest(config=self.header.config, encoders=self.header.encoders, resolution=self.header.resolution,
                        buckets=self.header.buckets, sample_format=self.header.sample_format, shards=shards,
                        empty_plans=[r["empty"] for r in done.values() if "empty" in r],
                        status="complete" if complete else "in_progress",
                        records_read=self.plan.source["records"], plan_skipped=self.plan.skipped,
                        source_fields=self.plan.source_fields)

    def publish(self) -> Manifest:
        """Write ``manifest.json`` (and, once every shard is done, ``failures.jsonl`` first) from the records."""
        done = self.done()
        while True:
            manifest = self.manifest(done)
            if manifest.status == "complete":
                write_failures(self.storage, manifest)  # the manifest last: it is what says the set is complete
            write_manifest(self.storage, manifest)
            if manifest.status == "complete":
                return manifest
            # Shards recorded while we wrote: another worker may have written the complete manifest
            # before ours landed, so ours must not be the last word.
            again = self.done()
            if set(again) == set(done):
                return manifest
            done = again


def finish_by_hand(storage: Storage) -> str:
    """``shardkit merge``: write the manifest from the done records; refuse while shards are missing."""
    plan = read_plan(storage)
    if plan is None:
        raise ShardkitError(f"no {PLAN_NAME} in {storage.url}: is it the OUTPUT of a `shardkit build` (that got as "
                            f"far as planning)?")
    header = read_manifest_at(storage, MANIFEST_NAME)
    ledger = Ledger(storage, plan, BucketTable(int(plan.config["resolution"])), header)
    manifest = ledger.publish()
    if manifest.status != "complete":
        missing = [name for position, name in enumerate(ledger.names) if position not in ledger.done()]
        raise ShardkitError(f"{len(missing)} of {len(ledger.names)} planned shards are not done yet ({missing[0]}"
                            f"{', ...' if len(missing) > 1 else ''}); run the build again, with any number of "
                            f"processes, to write them (the manifest lists the {len(ledger.names) - len(missing)} "
                            f"that are done)")
    data = manifest.as_json()
    return (f"wrote {storage.url_of(MANIFEST_NAME)}: {data['totals']['samples']} samples in "
            f"{data['totals']['shards']} shards, {data['records']['skipped']} skipped of {data['records']['read']} "
            f"records read")
