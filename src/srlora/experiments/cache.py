"""Integrity of the asset cache: a per-file sha256 manifest written at fetch time and
checked whenever a cached asset is used.

Each asset folder holds ``.srlora-manifest.json`` (``{file: {"size", "sha256"}}``, written
when the folder was built from a sha256-checked archive) and ``.srlora-verified.json`` (the
size and mtime of each file when it was last hashed). On use, a file whose size and mtime
still match its stamp is taken as verified; any other file is hashed again and must match
the manifest, and where the asset pins a file's hash in code (files copied byte for byte
out of the archive), the manifest must agree with the pin. A missing, extra, truncated or
replaced file stops the caller with an error naming the file and the fix. Copying a cache
to another machine keeps it valid: the new mtimes only cost one re-hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from ..atomic import atomic_write_json

MANIFEST = ".srlora-manifest.json"
STAMP = ".srlora-verified.json"


class CacheError(RuntimeError):
    """A cached asset does not match the manifest written when it was fetched."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(folder)): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".srlora-")
    }


def write_manifest(folder: Path, pinned: Mapping[str, str] | None = None) -> dict[str, dict[str, object]]:
    """Hash every file of a freshly built asset folder into its manifest (and stamp).

    Raises:
        CacheError: a file pinned in code is missing or has another hash (the extraction
            did not produce the expected bytes).
    """
    manifest: dict[str, dict[str, object]] = {}
    stamp: dict[str, list[int]] = {}
    for rel, path in _files(folder).items():
        st = path.stat()
        manifest[rel] = {"size": st.st_size, "sha256": sha256_of(path)}
        stamp[rel] = [st.st_size, st.st_mtime_ns]
    for rel, digest in (pinned or {}).items():
        if manifest.get(rel, {}).get("sha256") != digest:
            raise CacheError(f"{folder.name}/{rel}: extracted bytes differ from the pinned sha256 {digest}.")
    atomic_write_json(folder / MANIFEST, manifest)
    atomic_write_json(folder / STAMP, stamp)
    return manifest


def verify(folder: Path, pinned: Mapping[str, str] | None = None) -> None:
    """Check a cached asset folder against its manifest (see the module doc).

    Raises:
        CacheError: naming the first file that is missing, unexpected, or differs, and the
            command that rebuilds the folder.
    """
    name = folder.name
    fix = f"run `srlora fetch {name} --force` to fetch it again"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        if pinned is None:
            raise CacheError(
                f"{folder}: this cached asset has no integrity manifest (written by an older srlora, or not by "
                f"srlora at all), so it cannot be checked; {fix}."
            ) from None
        manifest = None  # an older cache of pinned files: adopt it if every pin matches
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{folder / MANIFEST}: unreadable ({exc}); {fix}.") from exc
    if manifest is None:
        files = _files(folder)
        for rel, digest in pinned.items():  # type: ignore[union-attr]
            if rel not in files or sha256_of(files[rel]) != digest:
                raise CacheError(f"{folder / rel}: missing or not the file srlora fetches; {fix}.")
        write_manifest(folder, pinned)
        return
    for rel, digest in (pinned or {}).items():
        if manifest.get(rel, {}).get("sha256") != digest:
            raise CacheError(f"{folder / MANIFEST}: its entry for {rel} does not match the pinned sha256; {fix}.")
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        stamp = {}
    files = _files(folder)
    extra = sorted(set(files) - set(manifest))
    if extra:
        raise CacheError(f"{folder / extra[0]}: not part of the asset as fetched; {fix}.")
    changed = False
    for rel, entry in manifest.items():
        path = files.get(rel)
        if path is None:
            raise CacheError(f"{folder / rel}: missing from the cached asset; {fix}.")
        st = path.stat()
        if st.st_size != entry["size"]:
            raise CacheError(
                f"{path}: {st.st_size} bytes, but {entry['size']} when it was fetched (truncated or replaced); {fix}."
            )
        if stamp.get(rel) == [st.st_size, st.st_mtime_ns]:
            continue
        if sha256_of(path) != entry["sha256"]:
            raise CacheError(f"{path}: its sha256 differs from the one recorded when it was fetched; {fix}.")
        stamp[rel] = [st.st_size, st.st_mtime_ns]
        changed = True
    if changed:
        with contextlib.suppress(OSError):  # a read-only cache stays usable; it is hashed again next time
            atomic_write_json(folder / STAMP, stamp)
