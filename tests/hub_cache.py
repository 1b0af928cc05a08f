"""A Hugging Face hub cache folder written the way ``huggingface_hub`` writes one, without a network.

``snapshot_download`` stores a model repo under ``$HF_HUB_CACHE`` as::

    models--owner--name/
        blobs/<etag>                     each file's bytes once (etag: sha256 for LFS files such as
                                         safetensors, the git blob sha1 for the others)
        snapshots/<commit>/<file>        relative symlinks ../../blobs/<etag>
        refs/<branch or tag>             the commit hash it points to
        trees/<commit>.json              the repo's file listing at that commit (newer clients)

:func:`publish` lays a ``save_pretrained`` folder out so, naming everything through the client's
own helpers (folder name, hashes, tree listing); tests check the result with the client's own
reader (``scan_cache_dir``) before relying on it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")  # stored through git LFS on the hub


def publish(
    cache: Path,
    repo_id: str,
    folder: Path,
    commit: str,
    refs: tuple[str, ...] = ("main",),
    remote_only: dict[str, bytes] | None = None,
    omit: tuple[str, ...] = (),
) -> Path:
    """Cache every file of ``folder`` as ``repo_id`` at ``commit``; returns the snapshot folder.

    ``remote_only``: files the repo holds on the hub that a download did not fetch (they appear in
    the tree listing only, as files outside the download's patterns do). ``omit``: files listed and
    not cached, as an interrupted download leaves them.
    """
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils.sha import git_hash

    storage = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    tree = {}
    files = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
    for name, data in {**files, **(remote_only or {})}.items():
        lfs = name.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs else git_hash(data)
        tree[name] = (len(data), etag, lfs, git_hash(data))
        if name not in files or name in omit:
            continue
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = snapshot / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no trailing newline, as the client writes it
    _write_tree(storage, commit, tree)
    return snapshot


def _write_tree(storage: Path, commit: str, tree: dict) -> None:
    """The ``trees/<commit>.json`` listing, through the client's own writer where it has one."""
    try:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    except ImportError:  # clients before the tree cache: snapshots are trusted as they are
        return
    entries = {
        name: TreeCacheEntry(
            size=size,
            blob_id=blob_id,
            lfs_sha256=etag if lfs else None,
            lfs_size=size if lfs else None,
        )
        for name, (size, etag, lfs, blob_id) in tree.items()
    }
    write_tree_cache(str(storage), commit, entries)


def has_tree_cache() -> bool:
    """Whether the installed client records tree listings (and so can tell a partial snapshot)."""
    try:
        from huggingface_hub import _tree_cache  # noqa: F401
    except ImportError:
        return False
    return True
