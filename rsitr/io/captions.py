"""Caption corpora in the formats remote-sensing datasets are distributed in → one record per image.

Formats (auto-detected, or named):

- ``karpathy``: ``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`` as RSICD, RSITMD (with its extra
  ``keywords``), UCM and Sydney ship.
- ``coco``: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``, usually one file per split.
- ``albef``: a JSON list of ``{"image": "<split>/<file>", "caption": str | [str]}`` (ALBEF, PIR, HarMA), one
  entry per image or per caption; ``label_name`` becomes the label.
- ``amfmn``: the ``*_precomp`` text files, ``<split>_filename.txt`` beside ``<split>_caps.txt``; either one file
  name per image with k captions each, or one file name per caption.
- ``vt-rsbs``: CSV ``filename, split, label, sentence`` with ``sentence`` a Python-literal list.

Captions are normalised (``normalize_caption``) so that the same corpus read from different formats gives the same
strings. Files are decoded as UTF-8; a caption that is not valid UTF-8 or is empty after normalisation is rejected
on its own, the image keeps its other captions.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from rsitr.errors import UserError
from rsitr.io import storage

FORMATS = ("karpathy", "coco", "albef", "amfmn", "vt-rsbs")
SPLIT_NAMES = {
    "train": "train",
    "restval": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}
SEEDED_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
_SPLIT_IN_NAME = re.compile(r"(?:^|[^a-z])(train|restval|val|valid|validation|dev|test)(?:[^a-z]|$)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_SURROGATE = re.compile("[\udc80-\udcff]")


class CaptionFormatError(UserError, ValueError):
    """A caption file that is not in (or not valid for) the requested format."""


@dataclass
class CaptionRecord:
    """The captions of one image, with where its split came from."""

    split: str | None
    captions: list[str] = field(default_factory=list)
    label: str | None = None
    source: str = ""
    seen: int = 0


@dataclass
class Rejection:
    """An input (a caption, or a whole entry) that was not used, and why."""

    input: str
    reason: str
    captions: int = 1


@dataclass
class CaptionCorpus:
    """Every image named by a set of caption files, and what was rejected while reading them."""

    records: dict[str, CaptionRecord] = field(default_factory=dict)
    rejected_captions: list[Rejection] = field(default_factory=list)
    duplicate_entries: list[Rejection] = field(default_factory=list)
    captions_seen: int = 0
    formats: dict[str, str] = field(default_factory=dict)


def normalize_caption(text: str) -> str:
    """Lower-case, single spaces, no space before punctuation, no final full stop.

    RSICD is distributed both as raw sentences (``"A playground is near trees"``) and tokenised
    (``"a playground is near trees ."``); this maps both to one string. The towers are uncased, so nothing is lost.
    """
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split())).lower()
    return text.rstrip(" .")


def split_from_name(name: str) -> str | None:
    """``train``/``val``/``test`` when a file name says so (``captions_val2017.json``, ``test_caps.txt``)."""
    match = _SPLIT_IN_NAME.search(PurePosixPath(name).name.lower())
    return SPLIT_NAMES[match.group(1)] if match else None


def seeded_split(image_id: str, seed: int = 0) -> str:
    """A reproducible 80/10/10 train/val/test split: ``sha256(f"{seed}:{image_id}")`` as a fraction in [0, 1).

    Independent of file order and of which other images exist, so adding images never moves old ones.
    """
    value = int.from_bytes(hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for split, fraction in SEEDED_FRACTIONS:
        edge += fraction
        if value < edge:
            return split
    return SEEDED_FRACTIONS[-1][0]


def read_split_table(uri: str) -> dict[str, tuple[str, str | None]]:
    """A CSV with ``filename`` and ``split`` columns (and optionally ``label``), like ``rsicd_splits.csv``.

    Raises:
        CaptionFormatError: the file lacks the columns or names an unknown split.
    """
    text = _read_text(uri)
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"filename", "split"} <= set(reader.fieldnames):
        raise CaptionFormatError(f"{uri}: a split table needs 'filename' and 'split' columns")
    table: dict[str, tuple[str, str | None]] = {}
    for line, row in enumerate(reader, start=2):
        split = SPLIT_NAMES.get((row["split"] or "").strip().lower())
        if split is None:
            raise CaptionFormatError(f"{uri}:{line}: unknown split {row['split']!r}")
        table[row["filename"].strip()] = (split, (row.get("label") or "").strip() or None)
    return table


def _read_text(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        data: bytes = handle.read()
    # surrogateescape keeps undecodable bytes visible, so one bad caption is rejected instead of the whole file
    return data.decode("utf-8", errors="surrogateescape")


@dataclass
class _Entry:
    image: str
    split: str | None
    label: str | None
    captions: list[Any]
    per_image: bool


def _strip_split_prefix(image: str) -> tuple[str, str | None]:
    head, _, rest = image.partition("/")
    if rest and head.lower() in SPLIT_NAMES:
        return rest, SPLIT_NAMES[head.lower()]
    return image, None


def _split_value(value: Any) -> str | None:
    if value in (None, "", "none"):
        return None
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise CaptionFormatError(f"unknown split {value!r}")
    return split


def _karpathy(data: Any) -> Iterator[_Entry]:
    for item in data["images"]:
        raw = [s.get("raw", "") if isinstance(s, dict) else s for s in item.get("sentences", [])]
        yield _Entry(item["filename"], _split_value(item.get("split")), item.get("label"), raw, per_image=True)


def _coco(data: Any) -> Iterator[_Entry]:
    names = {image["id"]: image["file_name"] for image in data["images"]}
    for annotation in data["annotations"]:
        name = names.get(annotation["image_id"])
        if name is None:
            raise CaptionFormatError(f"annotation {annotation.get('id')} names unknown image {annotation['image_id']}")
        yield _Entry(name, None, None, [annotation.get("caption", "")], per_image=False)


def _albef(data: Any) -> Iterator[_Entry]:
    for item in data:
        image, split = _strip_split_prefix(item["image"])
        caption = item["caption"]
        captions = caption if isinstance(caption, list) else [caption]
        yield _Entry(image, split, item.get("label_name"), captions, per_image=isinstance(caption, list))


def _vt_rsbs(text: str) -> Iterator[_Entry]:
    for row in csv.DictReader(io.StringIO(text)):
        sentences = ast.literal_eval(row["sentence"])
        if not isinstance(sentences, list):
            raise CaptionFormatError(f"row for {row['filename']}: 'sentence' is not a list")
        yield _Entry(row["filename"], _split_value(row.get("split")), row.get("label") or None, sentences, True)


def _amfmn(names_uri: str, caps_uri: str) -> Iterator[_Entry]:
    names = [line.strip() for line in _read_text(names_uri).splitlines() if line.strip()]
    caps = _read_text(caps_uri).splitlines()
    while caps and not caps[-1].strip():
        caps.pop()
    if not names or len(caps) % len(names):
        raise CaptionFormatError(
            f"{caps_uri}: {len(caps)} captions do not divide over the {len(names)} file names of {names_uri}"
        )
    per = len(caps) // len(names)
    for index, name in enumerate(names):
        yield _Entry(name, None, None, caps[index * per : (index + 1) * per], per_image=per > 1)


def detect_format(uri: str) -> str:
    """Guess the format of a caption file (or AMFMN folder) from its name and content.

    Raises:
        CaptionFormatError: the format cannot be recognised.
    """
    name = PurePosixPath(uri).name.lower()
    if name.endswith(".csv"):
        return "vt-rsbs"
    if name.endswith(("_caps.txt", "_filename.txt")) or storage.is_dir(uri):
        return "amfmn"
    if name.endswith(".json"):
        try:
            data = json.loads(_read_text(uri))
        except json.JSONDecodeError as err:
            raise CaptionFormatError(f"{uri}: not valid JSON ({err})") from err
        return _json_format(uri, data)
    raise CaptionFormatError(f"{uri}: unknown caption format; supported: {', '.join(FORMATS)}")


def _json_format(uri: str, data: Any) -> str:
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return "coco"
    if isinstance(data, dict) and "images" in data:
        return "karpathy"
    if isinstance(data, list) and data and isinstance(data[0], dict) and "image" in data[0]:
        return "albef"
    raise CaptionFormatError(f"{uri}: JSON is none of karpathy, coco or albef caption layouts")


def _amfmn_pairs(uri: str) -> list[tuple[str, str, str]]:
    """``(names file, captions file, split name)`` for an AMFMN folder or one of its files."""
    fs, path = storage.filesystem(uri)
    if fs.isdir(path):
        base = storage.resolve(uri)
        prefixes = sorted(PurePosixPath(p).name[: -len("_caps.txt")] for p in fs.glob(f"{path}/*_caps.txt"))
    else:
        base, file_name = storage.resolve(uri).rsplit("/", 1)
        prefixes = [re.sub(r"_(caps|filename)\.txt$", "", file_name)]
    if not prefixes:
        raise CaptionFormatError(f"{uri}: no AMFMN *_caps.txt files")
    pairs = []
    for prefix in prefixes:
        names, caps = storage.join(base, f"{prefix}_filename.txt"), storage.join(base, f"{prefix}_caps.txt")
        if not storage.exists(names) or not storage.exists(caps):
            raise CaptionFormatError(f"{uri}: AMFMN needs both {prefix}_filename.txt and {prefix}_caps.txt")
        pairs.append((names, caps, prefix))
    return pairs


def _entries(uri: str, fmt: str) -> Iterator[tuple[str, _Entry]]:
    """``(name of the file the entry came from, entry)`` for every entry of one caption source."""
    if fmt == "amfmn":
        for names, caps, _prefix in _amfmn_pairs(uri):
            for entry in _amfmn(names, caps):
                yield caps, entry
        return
    text = _read_text(uri)
    if fmt == "vt-rsbs":
        for entry in _vt_rsbs(text):
            yield uri, entry
        return
    data = json.loads(text)
    readers = {"karpathy": _karpathy, "coco": _coco, "albef": _albef}
    if fmt not in readers:
        raise CaptionFormatError(f"{uri}: unknown caption format {fmt!r}; supported: {', '.join(FORMATS)}")
    for entry in readers[fmt](data):
        yield uri, entry


def read_corpus(sources: list[str], fmt: str = "auto") -> CaptionCorpus:
    """Read one or more caption files (or AMFMN folders) into one record per image file name.

    The split of each image comes from the entry when the format carries one, else from the caption file's name;
    it stays ``None`` otherwise (the caller decides). Entries of per-caption formats are merged per image; a second
    per-image entry for the same image, or entries that disagree on the split, are rejected as duplicates.

    Raises:
        CaptionFormatError: a file is missing, of an unknown format, or does not parse as its format.
    """
    corpus = CaptionCorpus()
    seen_per_image: set[tuple[str, str]] = set()
    for source in sources:
        uri = storage.resolve(source)
        if not storage.exists(uri):
            raise CaptionFormatError(f"{source}: caption file does not exist")
        source_fmt = detect_format(uri) if fmt == "auto" else fmt
        if source_fmt not in FORMATS:
            raise CaptionFormatError(f"{source}: unknown caption format {fmt!r}; supported: {', '.join(FORMATS)}")
        corpus.formats[uri] = source_fmt
        try:
            for origin, entry in _entries(uri, source_fmt):
                _add(corpus, seen_per_image, origin, entry)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, SyntaxError, AttributeError) as err:
            if isinstance(err, CaptionFormatError):
                raise CaptionFormatError(f"{source}: {err}") from err
            raise CaptionFormatError(
                f"{source}: not a valid {source_fmt} caption file ({type(err).__name__}: {err})"
            ) from err
    return corpus


def _add(corpus: CaptionCorpus, seen_per_image: set[tuple[str, str]], origin: str, entry: _Entry) -> None:
    name = entry.image.strip()
    split = entry.split or split_from_name(origin)
    corpus.captions_seen += len(entry.captions)
    record = corpus.records.get(name)
    where = f"{PurePosixPath(origin).name}: {name}"
    reason = None
    if entry.per_image and (origin, name) in seen_per_image:
        reason = "duplicate image id: a second entry for the same image"
    elif record is not None and split is not None and record.split is not None and record.split != split:
        reason = f"duplicate image id with a conflicting split ({record.split} in {record.source})"
    if reason is not None:
        corpus.duplicate_entries.append(Rejection(where, reason, len(entry.captions)))
        return
    if entry.per_image:
        seen_per_image.add((origin, name))
    if record is None:
        record = corpus.records[name] = CaptionRecord(split, [], entry.label, PurePosixPath(origin).name)
    record.split = record.split or split
    record.label = record.label or (str(entry.label) if entry.label not in (None, "") else None)
    for raw in entry.captions:
        key = f"{name}#{record.seen}"
        record.seen += 1
        if not isinstance(raw, str):
            corpus.rejected_captions.append(Rejection(key, f"caption is not a string ({type(raw).__name__})"))
        elif _SURROGATE.search(raw):
            corpus.rejected_captions.append(Rejection(key, "caption is not valid UTF-8"))
        elif not (caption := normalize_caption(raw)):
            corpus.rejected_captions.append(Rejection(key, "empty caption"))
        else:
            record.captions.append(caption)
