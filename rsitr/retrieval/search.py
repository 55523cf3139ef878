"""Search an index: text → tiles (nearest tile embeddings to the encoded query) and image → captions (nearest
caption embeddings to the encoded image), optionally re-ranked by similarity-matrix re-weighting."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import shapely
import torch
from PIL import Image

from rsitr.config import Config
from rsitr.data.preprocess import decode_image, tokenize
from rsitr.evaluation.rerank import rerank_topk
from rsitr.io import storage
from rsitr.models import checkpoint as ckpt
from rsitr.models.msa import MSA
from rsitr.models.tokenizers import load_tokenizer
from rsitr.retrieval.index import ANN, AnnSettings, ann_settings, open_captions, open_index, sql_text
from rsitr.retrieval.index_meta import CellGrid, answering_checkpoint
from rsitr.retrieval.search_inputs import SearchError, SearchFilter, TextQuery, check_k
from rsitr.runtime.precision import inference, unit_float32, use_bf16, with_text_weights_in_bf16


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
    rerank_score: float | None = None


@dataclass
class CaptionHit:
    """One retrieved caption (image → text)."""

    rank: int
    score: float
    caption: str
    image_id: str
    caption_id: str
    rerank_score: float | None = None


# the most results, re-ranked candidates and id length one query may ask for (the CLI and the service alike)
MAX_ID_LENGTH = 512

# index searches a batch of queries runs at once, in threads every Searcher of the process shares
LOOKUP_THREADS = 2
_LOOKUPS: list[ThreadPoolExecutor] = []
_LOOKUPS_LOCK = threading.Lock()


def _lookups() -> ThreadPoolExecutor:
    with _LOOKUPS_LOCK:
        if not _LOOKUPS:
            _LOOKUPS.append(ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="index-search"))
        return _LOOKUPS[0]


# reference vectors the re-rank compares a query with (a fixed sample of the other side's table beyond this)
REFERENCE_LIMIT = 20_000


def nearest(
    table: Any,
    vector: Any,
    k: int,
    where: SearchFilter | None = None,
    ann: AnnSettings | None = None,
    grid: CellGrid | None = None,
) -> list[dict[str, Any]]:
    """The ``k`` rows nearest ``vector`` by cosine among those passing ``where`` (filtered before the top-k);
    ``ann``: the settings of the table's ANN index (None: exact search); ``grid``: its cell grid (None: none)."""
    request = table.search(vector, vector_column_name="vector").distance_type("cosine").limit(k)
    predicate = where.where(grid) if where else None
    if ann is not None:
        request = ann.apply(request, exact=ann.exact_for(table, predicate))
    if predicate:
        request = request.where(predicate, prefilter=True)
    rows: list[dict[str, Any]] = request.to_list()
    return rows


# a loaded checkpoint: model, config, state (see rsitr.models.checkpoint.load_checkpoint)
Loaded = tuple[MSA, Config, dict[str, Any]]


class Searcher:
    """An opened index and the model that matches it (loaded once, queried many times)."""

    def __init__(
        self, index: str, checkpoint: str | None = None, loaded: Loaded | None = None, bf16_queries: bool | None = None
    ) -> None:
        """Open ``index`` with ``checkpoint`` (default: the one the index records); ``loaded``: that checkpoint
        already loaded (a service re-opening a new index version keeps its model).

        ``bf16_queries``: run the text tower in bfloat16 autocast for queries (default: where the CPU has bf16 in
        hardware; see :mod:`rsitr.runtime.precision`).
        """
        self.index = index
        self.table, self.meta = open_index(index)
        source = answering_checkpoint(self.meta, checkpoint, index)
        self.checkpoint: str = source
        model, config, state = loaded or ckpt.load_checkpoint(source)
        if state["model_version"] != self.meta["model_version"]:
            raise SearchError(
                f"checkpoint {source} is model version {state['model_version']}, but index {index} was built "
                f"with {self.meta['model_version']}; re-embed or pass the matching checkpoint"
            )
        self.model: MSA = model
        self.state = state
        self.config = config
        self.ann = ann_settings(self.meta)
        self.grid = CellGrid.from_meta(self.meta)
        self.captions = open_captions(index, self.meta)
        # a large caption table has the ANN index built with the default settings (looked up once, not per query)
        self.captions_ann = ANN if self.captions is not None and self.captions.list_indices() else None
        self._references: dict[str, torch.Tensor] = {}
        self._tokenizer = load_tokenizer(config.model.text_model)  # loading it takes longer than a query
        self._tokenizer_lock = threading.Lock()
        device = next(self.model.parameters()).device
        wanted = "auto" if bf16_queries is None else ("bfloat16" if bf16_queries else "float32")
        self.bf16_queries = use_bf16(wanted, device)
        self._query_model = with_text_weights_in_bf16(model) if self.bf16_queries else model

    def search(self, query: str, k: int = 10, where: SearchFilter | None = None, rerank: int = 0) -> list[Hit]:
        """Top-``k`` tiles for ``query`` among those that pass ``where``; with ``rerank``, the top ``rerank``
        re-ranked against the index's captions (:mod:`rsitr.evaluation.rerank`) before the first ``k`` are kept."""
        return self.search_many([TextQuery(query, k, where, rerank)])[0]

    @torch.no_grad()
    def search_many(self, queries: Sequence[TextQuery]) -> list[list[Hit]]:
        """The tiles of :meth:`search` for each query, its text encoded together with the others in one text-tower
        pass (a service answering concurrent requests): one pass for many queries costs far less than one each."""
        if any(query.rerank for query in queries):
            self._caption_table()  # refused before any work: the index has no captions to re-rank against
        if not queries:
            return []
        vectors = self.encode_queries([query.text for query in queries])
        if len(queries) == 1:
            return [self._tiles_for(vectors[0], queries[0])]
        # the index searches run side by side (LanceDB releases the GIL while it searches)
        return list(_lookups().map(self._tiles_for, vectors, queries))

    def _tiles_for(self, vector: torch.Tensor, query: TextQuery) -> list[Hit]:
        rows = nearest(self.table, vector.numpy(), max(query.k, query.rerank), query.where, self.ann, self.grid)
        reranked = self._rerank(vector, rows, self._caption_table(), "captions") if query.rerank else None
        return [_hit(rank, row, score) for rank, (row, score) in enumerate(_order(rows, reranked, query.k), start=1)]

    def encode_query(self, query: str) -> torch.Tensor:
        """The unit embedding of a text query."""
        return self.encode_queries([query])[0]

    @torch.no_grad()
    def encode_queries(self, queries: list[str]) -> torch.Tensor:
        """Unit embeddings of text queries, one per row, from one text-tower pass."""
        with self._tokenizer_lock:  # a fast tokenizer must not be entered by two threads at once
            tokens = tokenize(
                queries, self.config.model.text_model, self.config.model.max_tokens, self._tokenizer, "longest"
            )
        with inference(self.bf16_queries):
            vectors = self._query_model.encode_text(
                torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"])
            )
        return unit_float32(vectors)

    @torch.no_grad()
    def captions_for_image(self, image: str, k: int = 10, rerank: int = 0) -> list[CaptionHit]:
        """Top-``k`` captions of the index for an image file (PNG, JPEG, TIFF, …); with ``rerank``, re-ranked
        against the indexed tiles."""
        return self.captions_for_vector(self.encode_image_bytes(_read_image(image), image), k, rerank)

    @torch.no_grad()
    def captions_for_vector(self, vector: torch.Tensor, k: int = 10, rerank: int = 0) -> list[CaptionHit]:
        """Top-``k`` captions for an image embedding (see :meth:`encode_image_bytes`)."""
        check_k(k, rerank)
        captions = self._caption_table()
        rows = nearest(captions, vector.numpy(), max(k, rerank), ann=self.captions_ann)
        reranked = self._rerank(vector, rows, self.table, "tiles") if rerank else None
        return [
            CaptionHit(rank, 1.0 - float(row["_distance"]), row["caption"], row["image_id"], row["caption_id"], score)
            for rank, (row, score) in enumerate(_order(rows, reranked, k), start=1)
        ]

    @torch.no_grad()
    def encode_image_bytes(self, data: bytes, name: str = "upload") -> torch.Tensor:
        """The embedding of an encoded image (PNG, JPEG, TIFF, …); ``name`` labels it in errors.

        Raises:
            SearchError: the bytes are not an image.
        """
        return self.encode_images([self.decode_image(data, name)])[0]

    def decode_image(self, data: bytes, name: str = "upload") -> np.ndarray:
        """The pixels the image tower reads from an encoded image (PNG, JPEG, TIFF, …); ``name`` labels it in errors.

        Raises:
            SearchError: the bytes are not an image.
        """
        try:
            pixels: np.ndarray = decode_image(data, self.config.model.image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise SearchError(f"image {name}: cannot be read as an image ({err})") from None
        return pixels

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Embeddings of decoded images (see :meth:`decode_image`), one per row, from one image-tower pass."""
        vectors: torch.Tensor = self.model.encode_image(torch.as_tensor(np.stack(images)))
        return vectors

    def similar_tiles(
        self,
        vector: torch.Tensor | np.ndarray,
        k: int = 10,
        where: SearchFilter | None = None,
        exclude: str | None = None,
    ) -> list[Hit]:
        """The ``k`` indexed tiles nearest an image embedding (image → tiles); ``exclude``: a tile id left out (the
        tile a "more like this" starts from)."""
        check_k(k, 0)
        vector = vector.numpy() if isinstance(vector, torch.Tensor) else np.asarray(vector, dtype=np.float32)
        rows = [
            row for row in nearest(self.table, vector, k + 1, where, self.ann, self.grid) if row["image_id"] != exclude
        ]
        return [_hit(rank, row) for rank, row in enumerate(rows[:k], start=1)]

    def tile(self, image_id: str) -> dict[str, Any] | None:
        """The index row of one tile (its vector included), or None when ``image_id`` is not indexed."""
        if not image_id or len(image_id) > MAX_ID_LENGTH:
            return None
        rows: list[dict[str, Any]] = self.table.search().where(f"image_id = {sql_text(image_id)}").limit(1).to_list()
        return rows[0] if rows else None

    def _caption_table(self) -> Any:
        if self.captions is None:
            raise SearchError(
                f"index {self.index} has no caption table (image→text search and --rerank use it); rebuild it with "
                "`rsitr embed --captions` and `rsitr index build --captions`"
            )
        return self.captions

    def _rerank(self, query: torch.Tensor, rows: list[dict[str, Any]], other: Any, name: str) -> list[float]:
        """Re-ranked scores of ``rows`` for ``query``, with a sample of the query side's table as references."""
        if not rows:  # e.g. a filter nothing passes
            return []
        if name not in self._references:
            vectors = other.to_arrow()["vector"] if other.count_rows() <= REFERENCE_LIMIT else None
            if vectors is None:
                picked = np.random.default_rng(0).choice(other.count_rows(), REFERENCE_LIMIT, replace=False)
                vectors = other.take_offsets(sorted(picked.tolist())).to_arrow()["vector"]
            self._references[name] = torch.as_tensor(np.stack(vectors.to_numpy(zero_copy_only=False)))
        candidates = torch.as_tensor(np.stack([row["vector"] for row in rows]))
        sim = torch.cat([query[None], self._references[name].to(query.dtype)]) @ candidates.to(query.dtype).t()
        order, scores = rerank_topk(
            sim,
            k=len(rows),
            candidates=torch.arange(len(rows))[None],
            queries=1,
            reverse_weight=self.config.train.rerank_reverse_weight,
        )
        reranked = [0.0] * len(rows)
        for position, score in zip(order[0].tolist(), scores[0].tolist(), strict=True):
            reranked[position] = score
        return reranked


def _read_image(uri: str) -> bytes:
    try:
        return storage.read_bytes(storage.resolve(uri))
    except OSError as err:
        raise SearchError(f"image {uri}: cannot be read ({err})") from None


def _order(
    rows: list[dict[str, Any]], reranked: list[float] | None, k: int
) -> list[tuple[dict[str, Any], float | None]]:
    if reranked is None:
        return [(row, None) for row in rows[:k]]
    order = sorted(range(len(rows)), key=lambda i: -reranked[i])
    return [(rows[i], reranked[i]) for i in order[:k]]


def tile_fields(row: dict[str, Any]) -> dict[str, Any]:
    """What an index row says about its tile: id, source, window, footprint (WKT), acquisition time (ISO)."""
    geometry = row.get("geometry")
    acquired = row.get("acquired_at")
    return {
        "image_id": row["image_id"],
        "source_uri": row.get("source_uri"),
        "window": row.get("window"),
        "footprint": shapely.from_wkb(geometry).wkt if geometry else None,
        "acquired_at": acquired.isoformat() if acquired is not None else None,
    }


def _hit(rank: int, row: dict[str, Any], rerank_score: float | None = None) -> Hit:
    return Hit(rank=rank, score=1.0 - float(row["_distance"]), rerank_score=rerank_score, **tile_fields(row))


def search(
    query: str,
    index: str,
    k: int = 10,
    checkpoint: str | None = None,
    where: SearchFilter | None = None,
    rerank: int = 0,
) -> list[dict[str, Any]]:
    """One-shot text → tiles search; see :class:`Searcher` to answer many queries with one model load."""
    return [asdict(hit) for hit in Searcher(index, checkpoint).search(query, k, where, rerank)]


def captions_for_image(
    image: str, index: str, k: int = 10, checkpoint: str | None = None, rerank: int = 0
) -> list[dict[str, Any]]:
    """One-shot image → captions search over the index's caption table."""
    return [asdict(hit) for hit in Searcher(index, checkpoint).captions_for_image(image, k, rerank)]
