"""What a search is given, and the checks it passes first: the query text, k, the re-rank depth, the where/when
filter.

Light on purpose (no torch, LanceDB or Ray): the CLI and the service refuse bad input with these before they load a
model or open an index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from rsitr.errors import UserError
from rsitr.retrieval.index_meta import CellGrid

MAX_K = 1000
MAX_RERANK = 1000


class SearchError(UserError, ValueError):
    """A query that cannot be answered (empty text, mismatched model, bad filter, …)."""


@dataclass(frozen=True)
class SearchFilter:
    """Where and when: tiles whose footprint intersects ``bbox`` (lon/lat, EPSG:4326) and that were acquired in
    [``after``, ``before``). Applied inside the index search, before the top-k is taken."""

    bbox: tuple[float, float, float, float] | None = None
    after: datetime | None = None
    before: datetime | None = None

    def __post_init__(self) -> None:
        if self.bbox is not None:
            min_lon, min_lat, max_lon, max_lat = self.bbox
            if not all(math.isfinite(v) for v in self.bbox):
                raise SearchError(f"bbox {self.bbox}: every bound must be a finite number")
            if not (
                -180 <= min_lon <= 180 and -180 <= max_lon <= 180 and -90 <= min_lat <= 90 and -90 <= max_lat <= 90
            ):
                raise SearchError(f"bbox {_bbox_text(self.bbox)}: longitudes must lie in ±180 and latitudes in ±90")
            if min_lon > max_lon or min_lat > max_lat:
                raise SearchError(f"bbox {_bbox_text(self.bbox)}: expected minx,miny,maxx,maxy with min <= max")
        if self.after and self.before and self.after >= self.before:
            raise SearchError(f"--after {self.after.isoformat()} is not before --before {self.before.isoformat()}")

    def where(self, grid: CellGrid | None = None) -> str | None:
        """The filter as a LanceDB (DataFusion SQL) predicate, or None for no filter; ``grid``: the index's cell
        grid, which lets a bbox start with the cells it can reach (the same rows pass, fewer bounds are read)."""
        clauses = []
        if self.bbox is not None:
            min_lon, min_lat, max_lon, max_lat = self.bbox
            cells = grid.cells_meeting(self.bbox) if grid is not None else None
            if cells is not None:
                clauses.append(f"cell IN ({', '.join(map(str, cells))})")
            clauses.append(f"max_lon >= {min_lon!r} AND min_lon <= {max_lon!r}")
            clauses.append(f"max_lat >= {min_lat!r} AND min_lat <= {max_lat!r}")
        if self.after is not None:
            clauses.append(f"acquired_at >= arrow_cast('{_utc(self.after)}', 'Timestamp(Microsecond, Some(\"UTC\"))')")
        if self.before is not None:
            clauses.append(f"acquired_at < arrow_cast('{_utc(self.before)}', 'Timestamp(Microsecond, Some(\"UTC\"))')")
        return " AND ".join(clauses) or None


@dataclass(frozen=True)
class TextQuery:
    """One text → tiles search: what to look for, how many tiles, where/when, and how many candidates to re-rank
    (0: off). Checked when made, so a bad query is refused on its own, before it joins others in a batch."""

    text: str
    k: int = 10
    where: SearchFilter | None = None
    rerank: int = 0

    def __post_init__(self) -> None:
        check_query(self.text)
        check_k(self.k, self.rerank)


def _bbox_text(bbox: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in bbox)


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """``minx,miny,maxx,maxy`` in degrees.

    Raises:
        SearchError: not four numbers.
    """
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise SearchError(f"bbox {text!r}: expected four numbers minx,miny,maxx,maxy (degrees)")
    return values


def parse_date(text: str, what: str) -> datetime:
    """An ISO date or date-time; without a zone it is UTC.

    Raises:
        SearchError: not an ISO date.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SearchError(f"{what} {text!r}: expected an ISO date such as 2024-05-01 or 2024-05-01T12:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_filter(
    bbox: str | None, after: str | None, before: str | None, names: tuple[str, str] = ("--after", "--before")
) -> SearchFilter | None:
    """The filter typed as text (``names``: what the two dates are called where they were typed), or None.

    Raises:
        SearchError: a bad bbox or date, or an empty time range.
    """
    if not (bbox or after or before):
        return None
    return SearchFilter(
        bbox=parse_bbox(bbox) if bbox else None,
        after=parse_date(after, names[0]) if after else None,
        before=parse_date(before, names[1]) if before else None,
    )


def check_query(query: str) -> None:
    """Refuse a query without text.

    Raises:
        SearchError: the query is empty or blank.
    """
    if not query.strip():
        raise SearchError("empty query: type what to look for, e.g. 'a river crossing farmland'")


def check_k(k: int, rerank: int) -> None:
    """Refuse a result count or re-rank depth out of range.

    Raises:
        SearchError: ``k`` outside 1…MAX_K, or ``rerank`` negative or over MAX_RERANK.
    """
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k={k}: ask for between 1 and {MAX_K} results")
    if rerank > MAX_RERANK:
        raise SearchError(f"--rerank {rerank}: re-rank at most {MAX_RERANK} candidates")
    if rerank < 0:
        raise SearchError(f"--rerank {rerank}: give the number of candidates to re-rank (0: off)")
