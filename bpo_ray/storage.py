"""Paths that may be local or cloud URIs (s3://, gs://, …), through pyarrow filesystems as Ray Train does."""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def absolute(path: str) -> str:
    """Local paths become absolute (Ray workers have another cwd); URIs pass through."""
    if is_uri(path):
        return path
    return os.path.abspath(path.removeprefix("file://"))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def split(path: str) -> tuple[str, str]:
    """(parent, last name) of a local path or URI."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent, name


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type == pafs.FileType.Directory:
        raise IsADirectoryError(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    tmp = p + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)  # readers never see a half-written file


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def remove_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def clear_dir(path: str, keep: tuple[str, ...] = ()) -> None:
    """Remove everything in the directory ``path`` except the entries named in ``keep``."""
    if not keep:
        return remove_dir(path)
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return None
    for info in fs.get_file_info(pafs.FileSelector(p)):
        if info.base_name in keep:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)
    return None


def list_dir(path: str) -> list[str]:
    """Names of the entries in the directory ``path`` (empty when it does not exist)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(p)))


def remove_file(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def make_dir(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def upload_dir(local_dir: str, target: str) -> None:
    """Copy a local directory's files to ``target`` (local path or URI), replacing files of the same name."""
    fs, p = resolve(target)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(local_dir, p, destination_filesystem=fs)


def download_dir(source: str, local_dir: str) -> None:
    fs, p = resolve(source)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(p, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def local_dir(path: str, cache_root: str | None = None) -> str:
    """A local directory holding what ``path`` holds: ``path`` itself when local; for a URI, a copy in
    ``cache_root`` (default: the system temp dir) keyed by the objects' names, sizes and modification times,
    so a model rewritten at the same URI is fetched again and an unchanged one only once per node.
    ``from_pretrained`` and vLLM read local directories only."""
    if not is_uri(path):
        return absolute(path)
    import fcntl
    import hashlib
    import tempfile

    fs, p = resolve(path)
    files = [f for f in fs.get_file_info(pafs.FileSelector(p, recursive=True)) if f.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"{path}: nothing there")
    listing = sorted((f.path, f.size, f.mtime_ns or 0) for f in files)
    key = hashlib.sha256(json.dumps([path, listing]).encode()).hexdigest()[:16]
    root = os.path.join(cache_root or tempfile.gettempdir(), "bpo-ray-objects")
    target = os.path.join(root, key)
    done = os.path.join(target, ".bpo-complete")
    if os.path.exists(done):
        return target
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{key}.lock"), "w") as lock:  # one download per node
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            download_dir(path, target)
            open(done, "w").close()
    return target
