"""WebDataset tar shards: which samples a shard holds and where each member's bytes lie, from the tar headers.

A shard is an uncompressed tar; a sample is the members sharing a key (the
member name up to the first dot of its base name, the WebDataset convention:
``dir/0001.jpg`` and ``dir/0001.cls`` form sample ``dir/0001``). Indexing reads
only the 512-byte headers and seeks over the data, so a shard is never unpacked
to disk and a 1 GB shard indexes in milliseconds; an item is then read with one
seek and one read. The standard ``tarfile`` does this (the ``webdataset``
library streams samples in order and cannot read one sample by its id, which
resuming, shuffled fine-tuning and evaluation need).
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

REMOTE_PREFIXES = ("s3://", "gs://", "http://", "https://", "pipe:", "hf://")


class ShardError(ValueError):
    """A shard pattern or file that cannot be read; the message names it."""


def expand(patterns: list[str]) -> list[str]:
    """Brace patterns (``tr-{000..099}.tar``, ``{a,b}.tar``) to the shard files, in order, each once; every file
    must exist."""
    from braceexpand import braceexpand

    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith(REMOTE_PREFIXES):
            raise ShardError(f"data.shards {pattern!r}: remote shards are not supported; copy them to a local "
                             "folder and name that")
        if pattern.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
            raise ShardError(f"data.shards {pattern!r}: compressed tars cannot be read by sample; "
                             "use uncompressed .tar shards (img2dataset and webdataset's TarWriter write them)")
        try:
            paths = list(braceexpand(pattern))
        except Exception as exc:  # noqa: BLE001 - braceexpand raises plain errors on unbalanced braces
            raise ShardError(f"data.shards {pattern!r} is not a valid brace pattern: {exc}") from None
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ShardError(f"data.shards {pattern!r}: {len(missing)} of {len(paths)} shard file(s) do not exist, "
                             f"e.g. {missing[0]}")
        out += [p for p in paths if p not in out]
    return out


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name (extension lower-cased), or None for a name without one."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass(frozen=True)
class ShardIndex:
    """Samples of one shard in tar order: key -> extension -> (data offset, size)."""

    samples: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    #: why the tar ends early (a truncated download), or None: the samples before it are kept
    truncated: str | None = None
    #: sample keys with a member name that appears more than once -> those member names
    duplicates: dict[str, list[str]] = field(default_factory=dict)


def index(path: str | os.PathLike) -> ShardIndex:
    """The shard's index, remembered per process while the file's size and mtime stay the same."""
    st = os.stat(path)
    return _index(os.fspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)  # ~2 MB per 5,000-sample shard; a scan and extraction read shard by shard
def _index(path: str, size: int, mtime_ns: int) -> ShardIndex:
    try:
        # plain ustar headers directly; pax or GNU long-name headers, base-256 sizes: through tarfile
        members, truncated = _ustar_members(path, size) or _tarfile_members(path, size)
    except OSError as exc:
        raise ShardError(f"cannot read shard {path}: {exc.strerror or exc}") from None
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    duplicates: dict[str, list[str]] = {}
    for name, offset, length in members:
        if (parsed := split_name(name)) is None:
            continue
        if offset + length > size:  # the member cut short: its sample cannot be whole
            samples.pop(parsed[0], None)
            break
        sample = samples.setdefault(parsed[0], {})
        if parsed[1] in sample:  # a later member would silently replace the first
            duplicates.setdefault(parsed[0], []).append(name)
        sample[parsed[1]] = (offset, length)
    return ShardIndex(samples, truncated, duplicates)


ZERO_BLOCK = bytes(512)
SPECIAL = frozenset(b"xgLK")  # pax extended and global headers, GNU long names and long link names


def _octal(field: bytes) -> int:
    """A tar header's octal number field; anything but octal digits (a sign, other digits) is a ValueError."""
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if digits and not all(48 <= c <= 55 for c in digits):  # b"0" .. b"7"
        raise ValueError(f"not an octal number: {digits[:24]!r}")
    return int(digits or b"0", 8)


def _ustar_members(path: str, size: int) -> tuple[list[tuple[str, int, int]], str | None] | None:
    """``([(name, data offset, size)] of regular files, why it ends early or None)`` from plain ustar/GNU headers
    (what ``tarfile``, webdataset and img2dataset write for short names), about 10x faster than ``tarfile``
    (whose per-header Python parsing took 5 s per 100,000 samples here); None when a header needs ``tarfile``.

    Headers are read with ``pread``, never through a memory map: a shard cut short while it is read is then an
    error naming it, not a SIGBUS. Sizes must be non-negative octal numbers, so every header moves forward.
    """
    if size == 0:
        return [], None
    out: list[tuple[str, int, int]] = []
    with open(path, "rb") as fh:
        fd, pos = fh.fileno(), 0
        while pos + 512 <= size:
            header = os.pread(fd, 512, pos)
            if len(header) < 512:
                raise ShardError(f"shard {path} shrank while it was read (no tar header at byte {pos}; the file "
                                 f"was {size} bytes when the scan began)")
            if header == ZERO_BLOCK:
                return out, None
            try:
                stored = _octal(header[148:156])
                if header[124] & 0x80:
                    return None  # a base-256 size (a member over 8 GiB)
                length = _octal(header[124:136])
            except ValueError as exc:
                return out, f"unreadable tar header at byte {pos} after {len(out)} member(s) ({exc})"
            if stored != sum(header[:148]) + 256 + sum(header[156:]):
                return out, f"bad tar header checksum at byte {pos} after {len(out)} member(s)"
            kind = header[156]
            if kind in SPECIAL:
                return None
            data = pos + 512
            if kind in (0, 48, 55):  # "\0", "0", "7": regular files
                name = header[:100].split(b"\0", 1)[0]
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0] + b"/" + name
                out.append((name.decode("utf-8", "surrogateescape"), data, length))
                if data + length > size:
                    return out, f"member {out[-1][0]} is cut short (the file ends at byte {size})"
            pos = data + (length + 511) // 512 * 512
    return out, (f"the tar ends without its end-of-archive blocks after {len(out)} member(s)" if pos < size
                 or pos > size else None)


def _tarfile_members(path: str, size: int) -> tuple[list[tuple[str, int, int]], str | None]:
    """As :func:`_ustar_members`, through ``tarfile`` (any header it reads)."""
    out: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, ValueError, OverflowError) as exc:  # e.g. a pax record's 20-digit length
                    return out, f"unreadable tar header after {len(out)} member(s) ({type(exc).__name__}: {exc})"
                if member is None:
                    return out, None
                if member.isfile():
                    out.append((member.name, member.offset_data, member.size))
                    if member.offset_data + member.size > size:
                        return out, f"member {member.name} is cut short (the file ends at byte {size})"
    except (tarfile.TarError, ValueError, OverflowError) as exc:
        raise ShardError(f"{path} is not a readable tar file ({type(exc).__name__}: {exc})") from None


def read(path: str | os.PathLike, where: tuple[int, int]) -> bytes:
    """One member's bytes: one seek, one read."""
    offset, size = where
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member at byte {offset} is cut short ({len(data)} of {size} bytes)")
    return data


@contextlib.contextmanager
def reader(path: str | os.PathLike) -> Iterator[Callable[[tuple[int, int]], bytes]]:
    """``read((offset, size))`` of many members of one shard through one open file (``pread``: a shard cut
    short meanwhile is an error naming it, never a SIGBUS as through a memory map)."""
    with open(path, "rb") as fh:
        fd = fh.fileno()

        def read_at(where: tuple[int, int]) -> bytes:
            data = os.pread(fd, where[1], where[0])
            if len(data) != where[1]:
                raise ShardError(f"shard {path} changed while it was read: the member at byte {where[0]} is cut "
                                 f"short ({len(data)} of {where[1]} bytes)")
            return data

        yield read_at


def open_member(path: str | os.PathLike, where: tuple[int, int]) -> io.BytesIO:
    return io.BytesIO(read(path, where))
