"""Text → tiles search over an index: encode the query with the text tower, nearest tiles by cosine."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import shapely
import torch

from rsitr import checkpoint as ckpt
from rsitr.data.pipeline import tokenize
from rsitr.index import open_index
from rsitr.models.msa import MSA


class SearchError(ValueError):
    """A query that cannot be answered (empty text, mismatched model, …)."""


@dataclass
class Hit:
    """One retrieved tile."""

    rank: int
    score: float
    image_id: str
    source_uri: str | None
    window: dict[str, int] | None
    footprint: str | None
    acquired_at: str | None


class Searcher:
    """An opened index and the text tower that matches it (loaded once, queried many times)."""

    def __init__(self, index: str, checkpoint: str | None = None) -> None:
        self.table, self.meta = open_index(index)
        source = checkpoint or self.meta.get("checkpoint")
        if not source:
            raise SearchError(f"index {index} records no checkpoint; pass --checkpoint")
        model, config, state = ckpt.load_checkpoint(source)
        if state["model_version"] != self.meta["model_version"]:
            raise SearchError(
                f"checkpoint {source} is model version {state['model_version']}, but index {index} was built "
                f"with {self.meta['model_version']}; re-embed or pass the matching checkpoint"
            )
        self.model: MSA = model
        self.config = config

    @torch.no_grad()
    def search(self, query: str, k: int = 10) -> list[Hit]:
        """Top-``k`` tiles for ``query``."""
        if not query.strip():
            raise SearchError("empty query: type what to look for, e.g. 'a river crossing farmland'")
        tokens = tokenize([query], self.config.model.text_model, self.config.model.max_tokens)
        vector = self.model.encode_text(
            torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"])
        )[0]
        rows = self.table.search(vector.numpy(), vector_column_name="vector").distance_type("cosine").limit(k).to_list()
        return [_hit(rank, row) for rank, row in enumerate(rows, start=1)]


def _hit(rank: int, row: dict[str, Any]) -> Hit:
    geometry = row.get("geometry")
    acquired = row.get("acquired_at")
    return Hit(
        rank=rank,
        score=1.0 - float(row["_distance"]),
        image_id=row["image_id"],
        source_uri=row.get("source_uri"),
        window=row.get("window"),
        footprint=shapely.from_wkb(geometry).wkt if geometry else None,
        acquired_at=acquired.isoformat() if acquired is not None else None,
    )


def search(query: str, index: str, k: int = 10, checkpoint: str | None = None) -> list[dict[str, Any]]:
    """One-shot search; see :class:`Searcher` to answer many queries with one model load."""
    return [asdict(hit) for hit in Searcher(index, checkpoint).search(query, k)]
