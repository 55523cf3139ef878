"""``rsitr``: one command with a sub-command per stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from rsitr.config import PRECISIONS, TEST_VIEW_COUNTS
from rsitr.errors import UserError
from rsitr.io.captions import FORMATS
from rsitr.io.geotiff import BAND_PRESETS, EDGE_MODES, SCENE_TILE_SIZE, TileOptions
from rsitr.train.command import add_train_arguments


def _demo_data(args: argparse.Namespace) -> None:
    from rsitr.synthetic import generate_demo_corpus

    print(json.dumps(generate_demo_corpus(args.out, seed=args.seed, scenes=args.scenes)))


def _ingest(args: argparse.Namespace) -> None:
    from rsitr import ingest
    from rsitr.io import geotiff

    common = {"workers": args.workers, "strict": args.strict, "overwrite": args.overwrite, "shard_mb": args.shard_mb}
    if args.kind == "scenes":
        names = [f.name for f in dataclasses.fields(geotiff.TileOptions)]
        options = geotiff.TileOptions(
            **{name: getattr(args, name) for name in names} | {"bands": geotiff.parse_bands(args.bands)}
        )
        manifest = ingest.ingest_scenes(
            args.paths, args.dataset, args.out, options, args.captions, split=args.split or "none", **common
        )
    elif args.kind == "corpus":
        manifest = ingest.ingest_corpus(
            args.images,
            args.captions,
            args.dataset,
            args.out,
            args.format,
            split=args.split,
            split_table=args.split_table,
            seed=args.seed,
            **common,
        )
    else:
        manifest = ingest.ingest_folder(args.folder, args.dataset, args.out, args.tile_size, workers=args.workers)
    summary = {k: manifest[k] for k in ("inputs_seen", "rows", "captions", "skipped", "splits")}
    print(json.dumps(summary | {"quarantined": len(manifest["quarantined"]), "shards": len(manifest["shards"])}))


def _inputs_exist(checkpoint: str | None = None, data: str | None = None, index: str | None = None) -> None:
    """The named checkpoint, dataset and index are there: checked from their small JSON files, before torch, Ray or
    LanceDB load (seconds), so a mistyped path is one line at once.

    Raises:
        CheckpointError, ShardsNotFoundError, IndexNotFoundError: naming the path.
    """
    from rsitr.io import shards
    from rsitr.models.checkpoint import read_meta
    from rsitr.retrieval.index_meta import require_index

    if checkpoint is not None:
        read_meta(checkpoint)
    if data is not None:
        shards.read_manifest(data)
    if index is not None:
        require_index(index)


def _train(args: argparse.Namespace) -> None:
    _inputs_exist(data=args.data)
    from rsitr.train.command import run_from_args

    run_from_args(args)


def _eval(args: argparse.Namespace) -> None:
    _inputs_exist(checkpoint=args.checkpoint, data=args.data)
    from rsitr.evaluation.evaluate import evaluate_checkpoint
    from rsitr.evaluation.metrics import format_metrics

    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.rerank, args.test_views)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_metrics(metrics, f"{args.split} ({int(metrics['images'])} images)"))


def _embed(args: argparse.Namespace) -> None:
    _inputs_exist(checkpoint=args.checkpoint, data=args.data)
    from rsitr.retrieval.embed import embed_archive

    summary = embed_archive(
        args.checkpoint,
        args.data,
        args.out,
        actors=args.actors,
        captions=args.captions,
        precision=args.precision,
        test_views=args.test_views,
    )
    print(json.dumps(summary))


def _index(args: argparse.Namespace) -> None:
    from rsitr.retrieval.index import build_index

    print(json.dumps(build_index(args.embeddings, args.out, args.checkpoint, captions=args.captions)))


def _index_update(args: argparse.Namespace) -> None:
    _inputs_exist(checkpoint=args.checkpoint)
    from rsitr.retrieval.reindex import reindex_archive

    summary = reindex_archive(args.archive, args.out, args.checkpoint, TileOptions(tile_size=args.tile_size))
    print(json.dumps(summary))


def _search(args: argparse.Namespace) -> None:
    from rsitr.retrieval.index_meta import read_index_meta, require_index
    from rsitr.retrieval.search_inputs import SearchError, check_k, check_query, parse_filter

    # every check a user's typing can fail runs before torch and LanceDB load (seconds)
    if (args.query is None) == (args.image is None):
        raise SearchError("give either a text query (text → tiles) or --image FILE (image → captions)")
    if args.image is not None and (args.bbox or args.after or args.before or args.html):
        raise SearchError("--bbox/--after/--before/--html apply to text → tiles search, not to --image")
    if args.query is not None:
        check_query(args.query)
    check_k(args.k, args.rerank)
    where = parse_filter(args.bbox, args.after, args.before)
    require_index(args.index)
    from rsitr.retrieval.search import captions_for_image, search

    if args.image is not None:
        captions = captions_for_image(args.image, args.index, args.k, args.checkpoint, args.rerank)
        if args.json:
            print(json.dumps(captions, indent=2))
            return
        for hit in captions:
            print(f"{hit['rank']:3d}  {hit['score']:.3f}  {hit['caption']}  ({hit['image_id']})")
        return

    hits = search(args.query, args.index, args.k, args.checkpoint, where, args.rerank)
    if args.html:
        from rsitr.retrieval.result_sheet import write_html

        meta = read_index_meta(args.index)
        context = f"top {len(hits)} of {meta['rows']} tiles in {args.index} (model {meta['model_version']})"
        write_html(args.html, args.query, hits, meta.get("data"), context)
    if args.json:
        print(json.dumps(hits, indent=2))
        return
    for hit in hits:
        print(
            f"{hit['rank']:3d}  {hit['score']:.3f}  {hit['image_id']}  {hit['acquired_at'] or '-'}  "
            f"{hit['footprint'] or '(no footprint)'}"
        )


def _add_test_views(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--test-views",
        type=int,
        choices=TEST_VIEW_COUNTS,
        default=None,
        help="average each image over this many flips/turns (default: the checkpoint's model.test_views)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``rsitr`` argument parser: one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="rsitr", description="Remote-sensing image-text retrieval")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_data(sub)
    _add_ingest(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_embed(sub)
    _add_index(sub)
    _add_search(sub)
    _add_serve(sub)
    return parser


def _add_demo_data(sub: Any) -> None:
    p = sub.add_parser("demo-data", help="generate the demo corpus (GeoTIFF scenes + captions)")
    p.add_argument("--out", default=".rsitr/demo-data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=12)
    p.set_defaults(func=_demo_data)


def _add_ingest(sub: Any) -> None:
    p = sub.add_parser("ingest", help="images/scenes + captions → Parquet shards")
    kinds = p.add_subparsers(dest="kind", required=True)
    k = kinds.add_parser("scenes", help="tile raster scenes (paths, globs, folders, s3:// URIs; a,b,c = band files)")
    k.add_argument("paths", nargs="+")
    tiles = TileOptions()  # the defaults live in the dataclass; flows take the dataclass itself
    k.add_argument("--tile-size", type=int, default=tiles.tile_size, help="window side in source pixels")
    k.add_argument("--out-size", type=int, default=tiles.out_size, help="stored tile side (default: tile size)")
    k.add_argument("--overlap", type=int, default=tiles.overlap)
    k.add_argument("--bands", default=None, help=f"R,G,B band numbers or a preset ({', '.join(BAND_PRESETS)})")
    k.add_argument("--max-nodata", type=float, default=tiles.max_nodata)
    k.add_argument("--edge", choices=EDGE_MODES, default=tiles.edge, help="partial windows at the right/bottom")
    k.add_argument("--require-georef", action="store_true", help="reject scenes without a usable Earth CRS")
    k.add_argument("--captions", action="append", default=None, help="caption file keyed by tile id (repeatable)")
    k.add_argument("--split", default=None, choices=["train", "val", "test", "none"])
    k = kinds.add_parser("corpus", help="an image folder and its caption files")
    k.add_argument("--images", required=True)
    k.add_argument("--captions", action="append", required=True, help="caption file or AMFMN folder (repeatable)")
    k.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    k.add_argument("--split", default=None, choices=["train", "val", "test"], help="split when the corpus has none")
    k.add_argument("--split-table", default=None, help="CSV of filename,split[,label] that decides the split")
    k.add_argument("--seed", type=int, default=0, help="seed of the 80/10/10 split for images with no split")
    k = kinds.add_parser("folder", help="a corpus folder (scenes/ or images/, plus captions)")
    k.add_argument("folder")
    k.add_argument("--tile-size", type=int, default=128)
    for k in kinds.choices.values():
        k.add_argument("--dataset", required=True)
        k.add_argument("--out", default=".rsitr/data")
        k.add_argument("--workers", type=int, default=None, help="parallel units (1: this process; default: all CPUs)")
        k.add_argument("--strict", action="store_true", help="exit non-zero when anything is quarantined")
        k.add_argument("--overwrite", action="store_true", help="replace a different ingest at the same place")
        k.add_argument("--shard-mb", type=int, default=64, help="target shard size")
    p.set_defaults(func=_ingest)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train MSA with Ray Train")
    add_train_arguments(p)
    p.set_defaults(func=_train)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="R@K and mR of a checkpoint on a split")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or finished run folder")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--rerank", type=int, default=None, metavar="K", help="re-rank each query's top K (0: off)")
    _add_test_views(p)
    p.set_defaults(func=_eval)


def _add_embed(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed an ingested archive's tiles")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--actors", type=int, default=None, help="model copies (default: one per core / GPU)")
    p.add_argument("--captions", action="store_true", help="also embed the captions (captions.parquet)")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on CPUs with bf16 hardware, else float32"
    )
    _add_test_views(p)
    p.set_defaults(func=_embed)


def _add_index(sub: Any) -> None:
    p = sub.add_parser("index", help="retrieval index")
    actions = p.add_subparsers(dest="action", required=True)
    b = actions.add_parser("build", help="build an index from embeddings")
    b.add_argument(
        "--embeddings", required=True, help="embeddings GeoParquet file, or the folder `rsitr embed --out` wrote"
    )
    b.add_argument("--out", required=True)
    b.add_argument("--checkpoint", default=None, help="checkpoint whose text tower answers queries")
    b.add_argument("--captions", default=None, help="caption embeddings (from `rsitr embed --captions`)")
    b.set_defaults(func=_index)
    u = actions.add_parser("update", help="index the scenes of an archive that are not indexed yet (by content)")
    u.add_argument("--archive", required=True, help="folder, glob or s3:// prefix of GeoTIFF scenes")
    u.add_argument("--out", required=True, help="the index to bring up to date (created when missing)")
    u.add_argument("--checkpoint", required=True, help="checkpoint, finished run or runs folder")
    u.add_argument("--tile-size", type=int, default=SCENE_TILE_SIZE, help="window side in source pixels")
    u.set_defaults(func=_index_update)


def _add_search(sub: Any) -> None:
    p = sub.add_parser("search", help="text → tiles, or --image FILE → captions")
    p.add_argument("query", nargs="?", default=None)
    p.add_argument("--image", default=None, help="an image file: search the index's captions instead (image → text)")
    p.add_argument("--rerank", type=int, default=0, metavar="K", help="re-rank the top K candidates (SMR; 0: off)")
    p.add_argument("--index", required=True)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--bbox", default=None, help="minx,miny,maxx,maxy in degrees: footprints intersecting it")
    p.add_argument("--after", default=None, help="acquired at or after this ISO date/time (UTC unless given)")
    p.add_argument("--before", default=None, help="acquired before this ISO date/time")
    p.add_argument("--json", action="store_true")
    p.add_argument("--html", default=None, help="also write a result sheet (thumbnails, scores, footprint map)")
    p.set_defaults(func=_search)


def _add_serve(sub: Any) -> None:
    v = sub.add_parser("serve", help="the search service: HTTP API and web page on Ray Serve")
    v.add_argument("--index", required=True, help="the index to answer from (re-opened when a new version appears)")
    v.add_argument("--checkpoint", default=None, help="default: the checkpoint the index records")
    v.add_argument("--host", default="127.0.0.1", help="bind address; beyond loopback RSITR_API_TOKEN is required")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with its own copy of the model")
    v.add_argument("--basemap", default=None, metavar="URL", help="an online XYZ basemap, https://…/{z}/{x}/{y}.png "
                   "(default: the packaged OpenStreetMap tiles to zoom 6, no network needed)")  # fmt: skip
    v.add_argument("--basemap-attribution", default="", metavar="TEXT", help="the credit --basemap's tiles require")
    v.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    import os
    import signal
    import threading

    from rsitr.service.basemap import BasemapSettings
    from rsitr.service.security import TOKEN_VARIABLE, required_digest

    required_digest(args.host, os.environ.get(TOKEN_VARIABLE))  # a token is needed beyond loopback: said first
    basemap = BasemapSettings(args.basemap, args.basemap_attribution)
    _inputs_exist(checkpoint=args.checkpoint, index=args.index)
    from rsitr.service import deployment

    url = deployment.start(
        args.index,
        args.checkpoint,
        args.host,
        args.port,
        args.replicas,
        os.environ.get(deployment.TOKEN_VARIABLE),
        basemap=basemap,
    )
    print(f"rsitr search is serving {args.index} at {url} (API: {url}docs); Ctrl-C stops it", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        deployment.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rsitr`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        args.func(args)
    except UserError as err:  # anything else is a bug: its traceback is kept
        print(f"rsitr {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
