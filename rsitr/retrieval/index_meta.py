"""An index's metadata file, ``index.json``: the typed record, its coarse spatial grid, and reading it.

Light on purpose (no torch or LanceDB): the CLI checks an index exists before it loads anything heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from rsitr.errors import IndexNotFoundError, UserError
from rsitr.io import storage

# the index's metadata file (``rsitr.retrieval.index`` writes it last; its presence means an index was built)
INDEX_META = "index.json"
# the index's coarse spatial grid (degrees per cell): 20° boxes over 10⁶ tiles read ~1 % of the rows' bounds
CELL_DEGREES = 10.0
# a bbox needing more cells than this is tested on every row's bounds (the list would prune little)
MAX_BBOX_CELLS = 1024
# footprint extents are differences of floats: widening by this keeps a rounding error from dropping a cell
_CELL_SLACK = 1e-6


class IndexMeta(TypedDict):
    """The content of ``index.json``: which LanceDB table answers, built how, from what."""

    table: str  # the LanceDB table of tiles
    rows: int
    model_version: str  # the checkpoint weights' digest every vector was embedded with
    kind: str  # "exact", or the ANN index type in lower case ("ivf_sq", "ivf_pq", …)
    checkpoint: str | None  # the checkpoint whose text tower answers queries
    built_at: str  # ISO time of the publish: the index version a service reports
    embeddings: NotRequired[str]  # the embeddings GeoParquet it was built from
    data: NotRequired[str | None]  # the ingested dataset the tiles came from (thumbnails are read from its shards)
    archive: NotRequired[str | None]  # the scene archive a re-index reads
    ann: NotRequired[dict[str, Any]]  # AnnSettings the ANN index was built with
    cells: NotRequired[dict[str, float]]  # the CellGrid's fields
    captions_table: NotRequired[str]  # the LanceDB table of caption embeddings, when indexed
    caption_rows: NotRequired[int]


class IndexCheckpointError(UserError, ValueError):
    """An index that records no checkpoint, opened without one."""


@dataclass(frozen=True)
class CellGrid:
    """The index's coarse lon/lat grid (``index.json``'s ``cells``).

    Each tile is filed under the cell of its footprint's south-west corner (the ``cell`` column, bitmap-indexed).
    A footprint that meets a bbox has that corner inside the bbox widened south and west by the widest footprint in
    the index, so a bbox search keeps those few cells first and tests the exact bounds only on their rows.
    """

    degrees: float = CELL_DEGREES
    widest_lon: float = 0.0  # the largest max_lon - min_lon in the index
    widest_lat: float = 0.0

    @property
    def columns(self) -> int:
        return math.floor(360 / self.degrees) + 1

    @property
    def rows(self) -> int:
        return math.floor(180 / self.degrees) + 1

    def cell(self, lon: Any, lat: Any) -> Any:
        """The cell of a south-west corner; works on floats and on numpy arrays alike (NaN in, NaN out)."""
        return ((lat + 90) // self.degrees) * self.columns + (lon + 180) // self.degrees

    def cells_meeting(self, bbox: tuple[float, float, float, float]) -> list[int] | None:
        """Every cell in which a footprint meeting ``bbox`` can have its south-west corner; None when there are
        more than :data:`MAX_BBOX_CELLS` or all of them (the bounds test alone is then as good)."""
        min_lon, min_lat, max_lon, max_lat = bbox
        first_column = max(0, int((min_lon - self.widest_lon - _CELL_SLACK + 180) // self.degrees))
        last_column = min(self.columns - 1, int((max_lon + 180) // self.degrees))
        first_row = max(0, int((min_lat - self.widest_lat - _CELL_SLACK + 90) // self.degrees))
        last_row = min(self.rows - 1, int((max_lat + 90) // self.degrees))
        count = (last_column - first_column + 1) * (last_row - first_row + 1)
        if count > MAX_BBOX_CELLS or count == self.columns * self.rows:
            return None
        return [
            row * self.columns + column
            for row in range(first_row, last_row + 1)
            for column in range(first_column, last_column + 1)
        ]

    @classmethod
    def from_meta(cls, meta: IndexMeta) -> CellGrid | None:
        """The grid an index records, or None (an index built before it had one)."""
        return cls(**meta["cells"]) if meta.get("cells") else None


def require_index(uri: str) -> str:
    """``uri`` resolved, once it holds a built index.

    Raises:
        IndexNotFoundError: no index was built at ``uri``.
    """
    uri = storage.resolve(uri)
    if not storage.exists(storage.join(uri, INDEX_META)):
        raise IndexNotFoundError(f"no index at {uri} (missing {INDEX_META}); build one with `rsitr index build`")
    return uri


def read_index_meta(uri: str) -> IndexMeta:
    """The ``index.json`` of the index at ``uri``.

    Raises:
        IndexNotFoundError: no index was built at ``uri``.
    """
    meta: IndexMeta = storage.read_json(storage.join(require_index(uri), INDEX_META))
    return meta


def answering_checkpoint(meta: IndexMeta, checkpoint: str | None, index: str) -> str:
    """The checkpoint that answers queries on ``index``: ``checkpoint`` when given, else the one the index records.

    Raises:
        IndexCheckpointError: neither names one.
    """
    source = checkpoint or meta.get("checkpoint")
    if not source:
        raise IndexCheckpointError(f"index {index} records no checkpoint; pass --checkpoint")
    return source
