"""Ingest: raster scenes or image folders plus caption corpora → Parquet shards and ``manifest.json``.

Every ingest is planned first (which inputs go to which shard), then the plan's units run — in this process or
as Ray tasks — and each unit writes one shard plus a small completion record under ``_ingest/``. A re-run of
the same plan skips finished units, so an interrupted ingest resumes and a finished one is left as it is; the
shards are deterministic, so a unit that runs twice writes the same bytes. The manifest is written last, after
the counts reconcile.
"""

from rsitr.errors import IngestError
from rsitr.ingest.corpus import IMAGE_SUFFIXES, find_captions, ingest_corpus, ingest_folder
from rsitr.ingest.runner import DEFAULT_SHARD_MB, PLAN_DIR, UnitReport
from rsitr.ingest.scenes import RASTER_SUFFIXES, expand_scenes, ingest_scenes

__all__ = [
    "DEFAULT_SHARD_MB",
    "IMAGE_SUFFIXES",
    "PLAN_DIR",
    "RASTER_SUFFIXES",
    "IngestError",
    "UnitReport",
    "expand_scenes",
    "find_captions",
    "ingest_corpus",
    "ingest_folder",
    "ingest_scenes",
]
