"""The ingest runner: plan → units (one shard each, resumable) → manifest.

Every ingest is planned first (which inputs go to which shard), then the plan's units run — in this process or
as Ray tasks — and each unit writes one shard plus a small completion record under ``_ingest/``. A re-run of
the same plan skips finished units, so an interrupted ingest resumes and a finished one is left as it is; the
shards are deterministic, so a unit that runs twice writes the same bytes. The manifest is written last, after
the counts reconcile.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime
from typing import Any, TypedDict, TypeVar

from rsitr.errors import IngestError
from rsitr.io import shards, storage
from rsitr.io.captions import CaptionCorpus, Rejection

log = logging.getLogger("rsitr.ingest")
PLAN_DIR = "_ingest"
DEFAULT_SHARD_MB = 64
Result = TypeVar("Result")


@dataclass
class UnitReport:
    """What one unit of an ingest wrote and rejected; stored as ``_ingest/<shard>.json`` when it finishes."""

    shard: shards.ShardEntry | None = None
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    quarantined: list[Rejection] = field(default_factory=list)
    skipped: int = 0
    inputs: int = 0
    without_footprint: int = 0
    captions_skipped: int = 0

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> UnitReport:
        """The report a finished unit stored (``asdict`` of one)."""
        return cls(**{**record, "quarantined": [Rejection(**q) for q in record.get("quarantined", [])]})

    def add_row(self, row: dict[str, Any]) -> None:
        """Count a row that will be written."""
        tally = self.splits.setdefault(row["split"], {"rows": 0, "captions": 0})
        tally["rows"] += 1
        tally["captions"] += len(row["captions"])

    def quarantine(self, name: str, reason: str, captions: int = 0) -> None:
        """Record an input that is not written."""
        self.quarantined.append(Rejection(name, reason, captions))
        log.warning("quarantined %s: %s", name, reason)


def shard_row(**values: Any) -> dict[str, Any]:
    """A row with every shard column, ``values`` filled in."""
    row: dict[str, Any] = {name: None for name in shards.SHARD_SCHEMA.names}
    row.update(values)
    return row


def unit_name(index: int) -> str:
    """The shard file name of unit ``index``."""
    return f"part-{index:05d}.parquet"


def run_unit(root: str, index: int, work: Callable[[], tuple[list[dict[str, Any]], UnitReport]]) -> UnitReport:
    """Run one unit unless its completion record exists (and its shard, whole); write its shard, then its record."""
    record_uri = storage.join(root, PLAN_DIR, f"{unit_name(index)}.json")
    if storage.exists(record_uri):
        done = UnitReport.from_record(storage.read_json(record_uri))
        if done.shard is None or storage.size(storage.join(root, done.shard["path"])) == done.shard["bytes"]:
            return done
        # e.g. an object store that crashed before the shard was durable, or a shard deleted by hand
        log.warning("%s: its shard is gone or of another size; running the unit again", record_uri)
    rows, report = work()
    if rows:
        report.shard = shards.write_shard(root, unit_name(index), rows)
    storage.write_json_atomic(record_uri, asdict(report))
    return report


def execute_units(tasks: Sequence[Callable[[], Result]], workers: int | None) -> list[Result]:
    """Run callables in order here (``workers == 1`` or a single task) or as Ray tasks, at most ``workers`` at once.

    ``workers=None`` uses every CPU the Ray cluster has.
    """
    if workers == 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    import ray

    from rsitr.runtime.raysession import init_ray

    init_ray()
    limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    remote: Any = ray.remote(num_cpus=1, max_retries=2)(_call)
    results: dict[int, Result] = {}
    pending: dict[Any, int] = {}
    queue = list(enumerate(tasks))
    while queue or pending:
        while queue and len(pending) < limit:
            index, task = queue.pop(0)
            pending[remote.remote(task)] = index
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            results[pending.pop(ref)] = ray.get(ref)
    return [results[i] for i in range(len(tasks))]


def _call(task: Callable[[], Result]) -> Result:
    return task()


def prepare_output(root: str, fingerprint: str, overwrite: bool) -> shards.Manifest | None:
    """Claim ``root`` for this plan; the finished manifest when this exact plan already completed there.

    Raises:
        IngestError: ``root`` holds a different ingest and ``overwrite`` is not set.
    """
    plan_uri = storage.join(root, PLAN_DIR, "plan.json")
    existing = storage.read_json(plan_uri).get("fingerprint") if storage.exists(plan_uri) else None
    has_output = existing is not None or storage.exists(storage.join(root, shards.MANIFEST_NAME))
    if has_output and existing != fingerprint:
        if not overwrite:
            raise IngestError(
                f"{root} already holds a different ingest (other inputs or parameters); "
                "choose another --out/--dataset or pass --overwrite to replace it"
            )
        for part in (PLAN_DIR, shards.SHARD_DIR, shards.MANIFEST_NAME):
            storage.remove_tree(storage.join(root, part))
    if existing == fingerprint and storage.exists(storage.join(root, shards.MANIFEST_NAME)):
        manifest = shards.read_manifest(root)
        if manifest.get("fingerprint") == fingerprint:
            return manifest
    if existing == fingerprint and (removed := storage.remove_temporaries(root)):
        log.info("resuming the ingest at %s: removed %d half-written file(s) of the interrupted run", root, removed)
    storage.write_json_atomic(plan_uri, {"fingerprint": fingerprint})
    return None


def plan_fingerprint(plan: Any) -> str:
    """A hash of the plan: the same inputs and parameters give the same fingerprint."""
    # records (a Rejection) hash as the dicts they were before they were typed, so fingerprints stay stable
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=_plain).encode()).hexdigest()


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else str(value)


def finish_ingest(
    root: str,
    reports: list[UnitReport],
    quarantined: list[Rejection],
    inputs_seen: int,
    identity: tuple[str, dict[str, Any]],
    caption_side: shards.CaptionStats,
    strict: bool,
    details: ManifestDetails | None = None,
) -> shards.Manifest:
    """Aggregate the unit reports into the manifest, write it, and enforce ``strict`` / "something usable".

    ``identity`` is the plan's fingerprint and parameters; ``details`` what one kind of ingest adds.
    """
    splits: dict[str, shards.SplitCounts] = {}
    for report in reports:
        for split, tally in report.splits.items():
            total = splits.setdefault(split, {"rows": 0, "captions": 0})
            total["rows"] += tally["rows"]
            total["captions"] += tally["captions"]
    all_quarantined = quarantined + [q for report in reports for q in report.quarantined]
    fingerprint, parameters = identity
    manifest: shards.Manifest = {
        "inputs_seen": inputs_seen,
        "rows": sum(t["rows"] for t in splits.values()),
        "captions": sum(t["captions"] for t in splits.values()),
        "skipped": sum(report.skipped for report in reports),
        "splits": splits,
        "quarantined": [{"input": q.input, "reason": q.reason} for q in all_quarantined],
        "captions_of_unwritten_inputs": sum(q.captions for q in all_quarantined)
        + sum(report.captions_skipped for report in reports),
        "shards": [report.shard for report in reports if report.shard],
        "fingerprint": fingerprint,
        "parameters": parameters,
        **caption_side,
        **(details or {}),
    }
    shards.write_manifest(root, manifest)
    log.info(
        "ingested %d rows into %s (%d quarantined, %d skipped)",
        manifest["rows"],
        root,
        len(all_quarantined),
        manifest["skipped"],
    )
    if not manifest["rows"]:
        reasons = "; ".join(f"{q['input']}: {q['reason']}" for q in manifest["quarantined"][:3])
        raise IngestError(
            f"nothing usable to ingest into {root} ({len(all_quarantined)} quarantined, {manifest['skipped']} "
            f"skipped{': ' + reasons if reasons else ''}); see {storage.join(root, shards.MANIFEST_NAME)}"
        )
    if strict and all_quarantined:
        raise IngestError(
            f"{len(all_quarantined)} input(s) quarantined and --strict was given; "
            f"see {storage.join(root, shards.MANIFEST_NAME)}"
        )
    return manifest


def timestamp_of(iso: str | None) -> datetime | None:
    """A datetime from an ISO string (None stays None)."""
    return datetime.fromisoformat(iso) if iso else None


class ManifestDetails(TypedDict, total=False):
    """The manifest keys only one kind of ingest writes (see :class:`rsitr.io.shards.Manifest`)."""

    scenes: list[dict[str, Any]]
    split_sources: dict[str, int]
    split_conflicts_with_table: int


def caption_stats(corpus: CaptionCorpus) -> shards.CaptionStats:
    """The manifest's caption counts and rejections."""
    return {
        "captions_seen": corpus.captions_seen,
        "captions_rejected": [{"input": r.input, "reason": r.reason} for r in corpus.rejected_captions],
        "caption_formats": corpus.formats,
    }


def entry_rejections(corpus: CaptionCorpus) -> list[Rejection]:
    """Caption entries rejected while reading (duplicates), as quarantined inputs with their captions."""
    return list(corpus.duplicate_entries)
