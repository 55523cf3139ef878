"""What a search service answers from: the current version of an index with its model, swapped for a new version
when a re-index publishes one, and the tiles' pixels read back from the shards they were ingested into."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import pyarrow.parquet as pq

from rsitr.io import shards, storage
from rsitr.models import checkpoint as ckpt
from rsitr.retrieval import result_sheet
from rsitr.retrieval.index_meta import answering_checkpoint, read_index_meta
from rsitr.retrieval.search import Loaded, Searcher
from rsitr.retrieval.search_inputs import SearchFilter, TextQuery

log = logging.getLogger(__name__)

# how often a service looks for a new index version (the nightly re-index publishes one; answered within a minute)
POLL_SECONDS = 15.0
THUMBNAIL_SIZE = 256
THUMBNAILS_KEPT = 512
WARM_FILTER = SearchFilter(bbox=(-10.0, -10.0, 10.0, 10.0))


class TileNotFoundError(LookupError):
    """An image id the index does not hold (or whose pixels no shard holds)."""


def warm(searcher: Searcher) -> None:
    """Run a search with and without a bbox, so the files a search reads are open and cached before requests come."""
    searcher.search_many([TextQuery("a warm-up query", 10), TextQuery("a warm-up query", 10, WARM_FILTER)])


class ShardImages:
    """The encoded images of one ingested dataset, by tile id. Where each id lives (shard, row group) is read once,
    from the id column only; a lookup then reads one row group of one shard."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._places: dict[str, tuple[str, int]] | None = None
        self._lock = threading.Lock()

    def _where(self) -> dict[str, tuple[str, int]]:
        with self._lock:
            if self._places is None:
                places: dict[str, tuple[str, int]] = {}
                for uri in shards.shard_uris(self.root):
                    fs, path = storage.filesystem(uri)
                    with fs.open(path, "rb") as handle:
                        parquet = pq.ParquetFile(handle)
                        for group in range(parquet.num_row_groups):
                            ids = parquet.read_row_group(group, columns=["image_id"])["image_id"].to_pylist()
                            places.update(dict.fromkeys(ids, (uri, group)))
                self._places = places
            return self._places

    def read(self, image_id: str) -> bytes | None:
        """The encoded image of ``image_id``, or None when no shard of this dataset holds it."""
        place = self._where().get(image_id)
        if place is None:
            return None
        uri, group = place
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as handle:
            table = pq.ParquetFile(handle).read_row_group(group, columns=["image_id", "image"])
        image: bytes = table["image"][table["image_id"].to_pylist().index(image_id)].as_py()
        return image


class SearchService:
    """An index opened for many concurrent queries. A watcher thread re-reads ``index.json`` every ``poll_seconds``
    and, when a new version was published, opens it and swaps it in: a request keeps the :class:`Searcher` it
    started with, so none is dropped across a swap. The model is loaded again only when the checkpoint changes."""

    def __init__(self, index: str, checkpoint: str | None = None, poll_seconds: float = POLL_SECONDS) -> None:
        self.index = storage.resolve(index)
        self._checkpoint = checkpoint
        self._loaded: tuple[str, Loaded] | None = None
        self._images: dict[str, ShardImages] = {}
        self._thumbnails: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.swaps = 0
        self.searcher = self._open()
        warm(self.searcher)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if poll_seconds > 0:
            self._watcher = threading.Thread(target=self._watch, args=(poll_seconds,), name="index-watch", daemon=True)
            self._watcher.start()

    def _open(self) -> Searcher:
        source = answering_checkpoint(read_index_meta(self.index), self._checkpoint, self.index)
        if self._loaded is None or self._loaded[0] != source:
            self._loaded = (source, ckpt.load_checkpoint(source))
        return Searcher(self.index, source, loaded=self._loaded[1])

    def refresh(self) -> bool:
        """Swap in the index version published since the current one was opened; True when it did."""
        meta, current = read_index_meta(self.index), self.searcher.meta
        if (meta["built_at"], meta["table"]) == (current["built_at"], current["table"]):
            return False
        searcher = self._open()
        warm(searcher)  # its first searches read the new table's files: here, not in a request
        self.searcher = searcher  # one reference assignment: a request sees the old version or the new, whole
        with self._lock:
            self._thumbnails.clear()
        self.swaps += 1
        log.info("index %s: now answering from the version built at %s", self.index, searcher.meta["built_at"])
        return True

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            try:
                self.refresh()
            except Exception as err:  # a half-published or unreadable version must not stop the service
                log.warning(
                    "index %s: new version not opened, still answering from the current one (%s)", self.index, err
                )

    def close(self) -> None:
        """Stop watching for new versions."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def health(self) -> dict[str, Any]:
        """What is served: the index version, model version and row counts."""
        searcher = self.searcher
        meta = searcher.meta
        return {
            "status": "ok",
            "index_version": meta["built_at"],
            "table": meta["table"],
            "table_version": int(searcher.table.version),
            "model_version": meta["model_version"],
            "rows": meta["rows"],
            "caption_rows": meta.get("caption_rows", 0),
            "kind": meta["kind"],
            "swaps": self.swaps,
        }

    def tile(self, image_id: str, searcher: Searcher | None = None) -> dict[str, Any]:
        """The index row of one tile.

        Raises:
            TileNotFoundError: the index holds no tile ``image_id``.
        """
        row = (searcher or self.searcher).tile(image_id)
        if row is None:
            raise TileNotFoundError(f"no tile {image_id!r} in this index")
        return row

    def thumbnail(self, image_id: str, size: int = THUMBNAIL_SIZE) -> bytes:
        """A PNG thumbnail of an indexed tile, read from the shards it was ingested into. Only ids the index holds
        are looked up, and only in the shards the index records: nothing in a request names a file.

        Raises:
            TileNotFoundError: not an indexed tile, or its shards are gone.
        """
        searcher = self.searcher
        row = self.tile(image_id, searcher)
        key = (str(searcher.meta["built_at"]), image_id)
        with self._lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        root = self._shard_root(searcher, row)
        if root is None:
            raise TileNotFoundError(f"tile {image_id!r}: this index records no shards to read its pixels from")
        with self._lock:
            images = self._images.setdefault(root, ShardImages(root))
        try:
            data = images.read(image_id)
        except (OSError, shards.ShardsNotFoundError) as err:
            raise TileNotFoundError(f"tile {image_id!r}: its shards under {root} cannot be read ({err})") from None
        if data is None:
            raise TileNotFoundError(f"tile {image_id!r}: not in the shards under {root}")
        png = result_sheet.thumbnail(data, size, "PNG")
        with self._lock:
            self._thumbnails[key] = png
            while len(self._thumbnails) > THUMBNAILS_KEPT:
                self._thumbnails.popitem(last=False)
        return png

    def _shard_root(self, searcher: Searcher, row: dict[str, Any]) -> str | None:
        """The dataset a tile's pixels are in: a re-indexed archive's batch, or the dataset the index was embedded
        from."""
        if row.get("batch"):
            return shards.dataset_root(storage.join(self.index, "batches"), row["batch"])
        data: str | None = searcher.meta.get("data")
        return data
