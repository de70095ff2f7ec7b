"""Where the cube's objects live: a folder on this machine (or a shared filesystem), or any fsspec
URL (``s3://bucket/cube.zarr``, ``gs://…``, ``memory://…``). The store code speaks only to
:class:`KV`: whole objects, written whole, so the same code runs on a disk and on an object store.

Only three operations are relied on for correctness, each atomic on a local disk, on NFS and on
S3: replacing an object whole (:meth:`KV.put`: a local file is written under a temporary name and
renamed; an S3 PUT is atomic), creating one only if it is absent (:meth:`KV.create`: ``link(2)`` of
a complete temporary file, or a PUT with ``If-None-Match: *``), and deleting one.

Object stores are reached with the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, a profile…) through fsspec;
no ambasync setting names them. Any failure to reach or use one becomes :class:`CubeStoreError`,
one line naming the URL.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from pathlib import Path
from typing import Iterable

from ambasync.errors import UpstreamError

# The fsspec protocols' packages, named in the one-line error when one is missing.
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "oci": "ocifs", "hf": "huggingface_hub", "webdav": "webdav4", "sftp": "paramiko",
            "ssh": "paramiko", "http": "aiohttp", "https": "aiohttp"}


class CubeStoreError(UpstreamError):
    """The store at a URL cannot be reached, read or written (exit 4 for a run; the analysis
    commands turn it into exit 2). The message is one line naming the URL."""


def is_remote(location: str | os.PathLike) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    text = str(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def missing_package(location: str) -> str | None:
    """The one-line message for a URL whose scheme has no fsspec implementation installed, else None."""
    import fsspec

    protocol = str(location).split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        return (f"{location}: the {protocol}:// scheme needs the package {PACKAGES.get(protocol, protocol + 'fs')} "
                f"(pip install {PACKAGES.get(protocol, protocol + 'fs')})")
    except ValueError:
        return f"{location}: no fsspec implementation knows the {protocol}:// scheme (see fsspec's list of protocols)"
    return None


def describe_error(location: str, exc: BaseException) -> str:
    """One line for a failure to use the store at ``location`` (reason first, no traceback)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, PermissionError):
        why = "access denied (check the credentials in the environment)"
    elif isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        why = "no such bucket"
    else:
        why = f"{type(exc).__name__}: {text}"
    return f"cannot use the cube store {location}: {why[:300]}"


class KV:
    """The objects of one store, by key relative to its root (``"zarr.json"``, ``".ambasync/members.json.gz"``)."""

    location: str

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> None: ...
    def put_many(self, items: dict[str, bytes]) -> None:
        for key, data in items.items():
            self.put(key, data)
    def put_parts(self, key: str, parts: list[bytes]) -> None:
        """One object made of ``parts`` (a local file is written piece by piece: no joined copy)."""
        self.put(key, b"".join(parts))
    def open_write(self, key: str):
        """(file, commit): write the object's bytes to ``file``, then ``commit()`` puts it whole."""
        import io

        buf = io.BytesIO()
        return buf, lambda: self.put(key, buf.getvalue())
    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        return {k: v for k in keys if (v := self.get(k)) is not None}
    def create(self, key: str, data: bytes) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)
    def list(self, prefix: str) -> dict[str, float]: ...  # key -> modification time (epoch s)
    def total_size(self) -> int: ...
    def exists(self) -> bool: ...

    @staticmethod
    def open(location: str | os.PathLike) -> "KV":
        if is_remote(location):
            return FsKV(str(location))
        return LocalKV(local_path(location))


class LocalKV(KV):
    """A folder: atomic replace by rename, create-if-absent by ``link(2)`` (atomic on NFS too)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _tmp(self, path: Path, data: bytes | list[bytes]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
        with open(tmp, "wb") as fh:
            if isinstance(data, list):
                fh.writelines(data)
            else:
                fh.write(data)
        return tmp

    def put_parts(self, key: str, parts: list[bytes]) -> None:
        self.put(key, parts)  # type: ignore[arg-type]

    def open_write(self, key: str):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
        fh = open(tmp, "wb")

        def commit() -> None:
            fh.close()
            os.replace(tmp, path)
        return fh, commit

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._tmp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._tmp(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._path(key).unlink()

    def list(self, prefix: str) -> dict[str, float]:
        base = self._path(prefix)
        out: dict[str, float] = {}
        stack = [base]
        while stack:
            try:
                it = os.scandir(stack.pop())
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif not entry.name.startswith("."):  # temporary files of a write in flight
                        with contextlib.suppress(FileNotFoundError):
                            out[str(Path(entry.path).relative_to(self.root))] = entry.stat().st_mtime
        return out

    def total_size(self) -> int:
        total = 0
        for root, _, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total

    def exists(self) -> bool:
        return self.root.exists()


class FsKV(KV):
    """Any fsspec filesystem (S3 through s3fs, with the standard AWS environment)."""

    def __init__(self, location: str):
        import fsspec

        self.location = location.rstrip("/")
        message = missing_package(self.location)
        if message:
            raise CubeStoreError(message)
        try:
            # no listings cache: other writers add records and grids while this one runs
            self.fs, self.root = fsspec.core.url_to_fs(self.location, use_listings_cache=False)
        except Exception as exc:  # noqa: BLE001  bad URL, bad credentials config: one line
            raise CubeStoreError(describe_error(self.location, exc)) from None
        self.root = self.root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _call(self, what, *args, **kwargs):
        try:
            return what(*args, **kwargs)
        except FileNotFoundError:
            raise
        except FileExistsError:
            raise
        except Exception as exc:  # noqa: BLE001  unreachable, unauthorised, throttled: one line naming the URL
            raise CubeStoreError(describe_error(self.location, exc)) from None

    def get(self, key: str) -> bytes | None:
        try:
            return self._call(self.fs.cat_file, self._path(key))
        except FileNotFoundError:
            return None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        found = self._call(self.fs.cat, [self._path(k) for k in keys], on_error="omit")  # concurrently
        start = len(self.root) + 1
        return {path[start:]: data for path, data in found.items() if isinstance(data, (bytes, bytearray))}

    def put(self, key: str, data: bytes) -> None:
        self._call(self.fs.pipe_file, self._path(key), data)

    def put_many(self, items: dict[str, bytes]) -> None:
        if items:  # one call: fsspec's async filesystems send them concurrently
            self._call(self.fs.pipe, {self._path(k): v for k, v in items.items()})

    def create(self, key: str, data: bytes) -> bool:
        try:
            self._call(self.fs.pipe_file, self._path(key), data, mode="create")
            return True
        except FileExistsError:
            return False
        except CubeStoreError as exc:
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise
        except TypeError:  # a filesystem without mode="create": best effort (not atomic)
            if self.get(key) is not None:
                return False
            self.put(key, data)
            return True

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(self.fs.rm_file, self._path(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        paths = [self._path(k) for k in keys]
        if paths:
            with contextlib.suppress(FileNotFoundError):
                self._call(self.fs.rm, paths)

    def list(self, prefix: str) -> dict[str, float]:
        base = self._path(prefix).rstrip("/")
        try:
            found = self._call(self.fs.find, base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        start = len(self.root) + 1
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            stamp = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
            if hasattr(stamp, "timestamp"):
                stamp = stamp.timestamp()
            try:
                stamp = float(stamp)
            except (TypeError, ValueError):
                stamp = time.time()
            out[path[start:]] = stamp
        return out

    def total_size(self) -> int:
        try:
            return int(self._call(self.fs.du, self.root, total=True))
        except FileNotFoundError:
            return 0

    def exists(self) -> bool:
        try:
            return bool(self._call(self.fs.exists, self._path("zarr.json"))) or bool(self.list(""))
        except FileNotFoundError:
            return False


def check_reachable(kv: KV) -> None:
    """Raise :class:`CubeStoreError` now if the store cannot be listed (unreachable, unauthorised,
    no such bucket), before anything is written anywhere."""
    if isinstance(kv, FsKV):
        try:
            kv.fs.ls(kv.root.split("/", 1)[0], detail=False)  # the bucket (a prefix exists only once written)
        except FileNotFoundError as exc:
            raise CubeStoreError(describe_error(kv.location, exc)) from None
        except Exception as exc:  # noqa: BLE001
            raise CubeStoreError(describe_error(kv.location, exc)) from None


def errno_is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
