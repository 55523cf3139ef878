"""Storage addressed by URI: a local path by default, ``s3://`` through s3fs.

S3 endpoint and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``) or the standard AWS configuration; they are never taken from code or logged.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import fsspec
from fsspec import AbstractFileSystem

from rsitr.errors import StorageUnreachableError

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _is_connection_failure(err: BaseException) -> bool:
    import botocore.exceptions  # only once something failed: importing this module stays light

    return isinstance(err, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError))


def _names_unreachable_store(
    action: str,
) -> Callable[[Callable[Concatenate[str, _P], _R]], Callable[Concatenate[str, _P], _R]]:
    """A remote call whose object store stops answering raises :class:`StorageUnreachableError` naming the object
    and the action, instead of a bare client error naming only the endpoint."""

    def decorate(call: Callable[Concatenate[str, _P], _R]) -> Callable[Concatenate[str, _P], _R]:
        @functools.wraps(call)
        def guarded(uri: str, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return call(uri, *args, **kwargs)
            except Exception as err:
                if not (is_remote(uri) and _is_connection_failure(err)):
                    raise
                raise _unreachable(action, uri, err, writing=action == "writing") from err

        return guarded

    return decorate


def _unreachable(action: str, uri: str, err: BaseException, writing: bool) -> StorageUnreachableError:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL") or "S3"
    partial = (
        "nothing partial was published (objects and index versions appear whole or not at all); " if writing else ""
    )
    return StorageUnreachableError(
        f"{action} {uri}: the object store ({endpoint}) did not answer ({type(err).__name__}); {partial}"
        "run again once it is back"
    )


@contextmanager
def unreachable_store_named(uri: str, action: str) -> Iterator[None]:
    """For libraries that talk to the object store themselves (LanceDB): a failure while the store holding ``uri``
    no longer answers becomes :class:`StorageUnreachableError` naming ``uri``; other failures pass unchanged."""
    try:
        yield
    except StorageUnreachableError:
        raise
    except Exception as err:
        if is_remote(uri) and not _answers(uri):
            raise _unreachable(action, uri, err, writing=True) from err
        raise


def _answers(uri: str) -> bool:
    fs, path = filesystem(uri)
    fs.invalidate_cache()
    try:
        fs.exists(path)
    except Exception as err:  # only unreachability matters here: any other answer means the store is up
        return not _is_connection_failure(err)
    return True


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names an object store rather than a local path."""
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str) -> str:
    """Local paths become absolute (so Ray workers and Prefect runs agree); remote URIs stay as given."""
    if is_remote(uri):
        return uri.rstrip("/")
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def filesystem(uri: str, random_access: bool = False) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it.

    ``random_access`` suits windowed raster reads: remote files are fetched in 256 KiB blocks as GDAL seeks
    (kept in an LRU), instead of s3fs's default 50 MiB read-ahead blocks.
    """
    uri = resolve(uri)
    if uri.startswith("s3://"):
        options: dict[str, Any] = {}
        if random_access:
            options.update(default_block_size=2**18, default_cache_type="blockcache")
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        fs = fsspec.filesystem("s3", **options)
        return fs, uri.removeprefix("s3://")
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def lance_options(uri: str) -> dict[str, str]:
    """LanceDB ``storage_options`` for ``uri``: the S3 endpoint from the environment (credentials LanceDB reads
    from the environment itself, so they never pass through here)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    if not uri.startswith("s3://") or not endpoint:
        return {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return {"aws_endpoint": endpoint, "allow_http": str(endpoint.startswith("http://")).lower(), "region": region}


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/``."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


@_names_unreachable_store("looking for")
def exists(uri: str) -> bool:
    """Whether a file or folder exists at ``uri``."""
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


@_names_unreachable_store("looking for")
def size(uri: str) -> int | None:
    """The size in bytes of the file at ``uri``; None when there is none."""
    fs, path = filesystem(uri)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None


@_names_unreachable_store("looking for")
def is_dir(uri: str) -> bool:
    """Whether a folder (or, on S3, a non-empty prefix) exists at ``uri``."""
    fs, path = filesystem(uri)
    return bool(fs.isdir(path))


TEMPORARY_MARK = ".tmp-"


def remove_temporaries(uri: str) -> int:
    """Delete the temporary files an interrupted atomic write left under a local folder; return how many.

    Only for a folder no other writer is using (ingest calls it when it resumes its own output).
    """
    if is_remote(uri) or not Path(uri).is_dir():
        return 0  # object stores publish whole objects: nothing half-written is ever left there
    stale = [p for p in Path(uri).rglob(f"*{TEMPORARY_MARK}*") if p.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)


@_names_unreachable_store("writing")
def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so readers see either nothing or the whole file.

    Locally the bytes go to a temporary sibling that is renamed into place; on S3 an object only becomes
    visible once its upload completes.
    """
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(uri: str, value: Any) -> None:
    """Write ``value`` as indented JSON atomically."""
    write_bytes_atomic(uri, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


@_names_unreachable_store("reading")
def read_json(uri: str) -> Any:
    """Read a JSON document."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return json.load(handle)


@_names_unreachable_store("reading")
def read_bytes(uri: str) -> bytes:
    """The whole content of a file."""
    if not is_remote(uri):
        with open(uri.removeprefix("file://"), "rb") as handle:  # the hot path of corpus ingest: no fsspec detour
            return handle.read()
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        data: bytes = handle.read()
    return data


@_names_unreachable_store("listing")
def list_files(uri: str) -> dict[str, int]:
    """Every file under a folder (recursively) as ``{path relative to the folder: size in bytes}``."""
    fs, path = filesystem(uri)
    found = fs.find(path, detail=True)
    base = path.rstrip("/") + "/"
    return {name[len(base) :]: int(info.get("size") or 0) for name, info in found.items() if name.startswith(base)}


@_names_unreachable_store("removing")
def remove_tree(uri: str) -> None:
    """Delete a folder and everything in it, if it exists."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def arrow_filesystem(uri: str) -> tuple[str, Any]:
    """``(path, pyarrow filesystem)`` for libraries that take pyarrow filesystems (Ray Train's storage).

    Local paths and S3 without a custom endpoint go as they are (``None``: let the library decide); S3 behind
    ``AWS_ENDPOINT_URL`` (MinIO, SeaweedFS, …) gets an explicit ``S3FileSystem`` and a path without the scheme.
    """
    uri = resolve(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    if not uri.startswith("s3://") or not endpoint:
        return uri, None
    from pyarrow.fs import S3FileSystem

    scheme, _, host = endpoint.partition("://")
    return uri.removeprefix("s3://"), S3FileSystem(endpoint_override=host, scheme=scheme or "https")
