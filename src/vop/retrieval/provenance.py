"""What an index records about the model it was built with, and the checks before that model is loaded
again: the checkpoint and backbone files (size + SHA-256, :func:`model_files`), their verification
(:func:`verify_model_files`) and the loading (:func:`load_index_model`).

A CheckpointError names a missing or changed file and what to do (restore it, or rebuild the index).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from vop.errors import CheckpointError, ConfigError
from vop.retrieval.format import file_record, sha256_file

__all__ = ["checkpoint_sha256", "backbone_file", "model_files", "sha256_of_checkpoint_records", "checkpoint_info",
           "verify_model_files", "load_index_model"]


def _folder_sha256(digests: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, digest in digests:
        h.update(name.encode() + bytes.fromhex(digest))
    return h.hexdigest()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a prompt checkpoint; for the authors' ModelScope folder, of its configuration and weights."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    from vop.formats.modelscope import read_folder

    folder = read_folder(path)
    return _folder_sha256([(f.name, sha256_file(f)) for f in (folder.config, folder.weights)])


def backbone_file(backbone: Any) -> Path | None:
    """The weights file a backbone (a path, or the name of a weights file shipped with vop) is read
    from; None for an architecture name (random weights, nothing on disk) or a CLIP object."""
    if not isinstance(backbone, (str, os.PathLike)):
        return None
    p = Path(backbone)
    if p.is_file():
        return p.resolve()
    if isinstance(backbone, str) and not p.exists():
        from vop.backbone.checkpoint import shipped_file  # where load_clip finds it

        shipped = shipped_file(backbone)
        return shipped.resolve() if shipped is not None else None
    return None


def model_files(checkpoint: str | os.PathLike, backbone: Any, whole: bool) -> list[dict[str, Any]]:
    """Size and SHA-256 of every file the model of an index is read from: the prompt checkpoint (for a
    ModelScope folder, its configuration and weights) and, unless the checkpoint holds every weight,
    the backbone weights file."""
    path = Path(checkpoint)
    if path.is_dir():
        from vop.formats.modelscope import read_folder

        folder = read_folder(path)
        out = [file_record(folder.config, "checkpoint config"), file_record(folder.weights, "checkpoint weights")]
    else:
        out = [file_record(path, "checkpoint")]
    bb = None if whole else backbone_file(backbone)
    if bb is not None:
        out.append(file_record(bb, "backbone"))
    return out


def sha256_of_checkpoint_records(files: Sequence[dict[str, Any]]) -> str:
    """:func:`checkpoint_sha256` from the records of :func:`model_files` (no second read)."""
    ck = [f for f in files if f["role"] == "checkpoint"]
    if ck:
        return ck[0]["sha256"]
    return _folder_sha256([(Path(f["path"]).name, f["sha256"]) for f in files
                           if f["role"] in ("checkpoint config", "checkpoint weights")])


def checkpoint_info(checkpoint: str | os.PathLike, backbone: str | None = None) -> dict[str, Any]:
    """What an index records about its model: enough to rebuild it and to notice a changed file."""
    from vop.methods.checkpoint import backbone_record, checkpoint_facts, read_checkpoint_meta

    path = Path(checkpoint)
    meta = read_checkpoint_meta(path, backbone if path.is_dir() else None)
    whole = checkpoint_facts(path, meta).whole_model  # its file holds every weight: no backbone to record
    bb = backbone or meta.get("backbone")
    if bb is None and not whole:
        raise ConfigError(f"{path}: records no backbone; pass --backbone (the CLIP weights the prompts were trained on)")
    files = model_files(path, bb, whole)
    return {
        "checkpoint": str(path.resolve()),
        "checkpoint_sha256": sha256_of_checkpoint_records(files),
        "method": meta["method"],
        "options": meta["options"],
        "frames": meta["frames"],
        "arch_name": meta.get("arch_name"),
        "backbone": backbone_record(bb) if not whole else None,
        "backbone_fingerprint": meta.get("backbone_fingerprint"),
        "files": files,  # size + SHA-256 of the checkpoint file(s) and the backbone weights file
        "checkpoint_meta": meta,
    }



def _digest(path: Path, memo: dict | None) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo is not None and key in memo:
        return memo[key]
    d = sha256_file(path)
    if memo is not None:
        memo[key] = d
    return d


def verify_model_files(info: dict[str, Any], *, checkpoint: str | os.PathLike | None = None, backbone: Any = None,
                       verify: bool = True, memo: dict | None = None, where: str = "the index",
                       rebuild: str = "vop index ... --rebuild") -> bool:
    """Check the files the model of an index is read from against the sizes and SHA-256 recorded when
    it was built (:func:`model_files`): the checkpoint (``checkpoint``: its new location, if it moved)
    and the backbone weights file (``backbone``: the one given instead of the recorded one). A
    CheckpointError names a missing or changed file. ``memo``: digests already computed in this
    process, by (path, size, mtime). ``verify=False``: the backbone file is hashed
    only if its size or modification time differs from the record (the checkpoint is always hashed:
    its SHA-256 identifies it). False when the index records no files (built by an older vop): the
    caller then checks the checkpoint's SHA-256 alone."""
    files = info.get("files")
    if not files:
        return False
    ckpt = Path(checkpoint or info["checkpoint"])
    bb_given = backbone if backbone is not None else info.get("backbone")
    for rec in files:
        role = rec["role"]
        if role == "checkpoint":
            actual: Path | None = ckpt
        elif role.startswith("checkpoint "):
            actual = ckpt / Path(rec["path"]).name
        elif role == "backbone":
            actual = backbone_file(bb_given)
            if actual is None:
                from vop.backbone.config import is_arch

                if not isinstance(bb_given, (str, os.PathLike)) or (isinstance(bb_given, str) and is_arch(bb_given)):
                    continue  # a CLIP object or an architecture: the weights fingerprint is compared when loading
                actual = Path(bb_given)  # a path that is not there
        else:
            continue
        what = f"the {role} file {where} was built with"
        if not actual.is_file():
            flag = "--backbone" if role == "backbone" else "--checkpoint"
            raise CheckpointError(f"{actual}: missing: {what} (recorded as {rec['path']}); restore it, or pass {flag} "
                                  f"with its new location")
        st = actual.stat()
        shortcut = not verify and role == "backbone" and st.st_mtime_ns == rec.get("mtime_ns")
        if st.st_size != rec["size"]:
            changed = f"{st.st_size:,} bytes, {rec['size']:,} when the index was built"
        elif not shortcut and _digest(actual, memo) != rec["sha256"]:
            changed = f"SHA-256 differs from {rec['sha256'][:12]}... recorded when the index was built"
        else:
            continue
        if role.startswith("checkpoint"):
            raise CheckpointError(f"{actual}: differs from the checkpoint this index was built with ({changed}): its video "
                                  f"embeddings would not match; restore {what}, or rebuild the index with this "
                                  f"checkpoint: {rebuild}")
        raise CheckpointError(f"{actual}: changed since {where} was built ({changed}): the video embeddings were made with "
                              f"other backbone weights; restore the file, or rebuild the index with it: {rebuild}")
    return True


def load_index_model(info: dict[str, Any], *, backbone: Any = None, checkpoint: str | os.PathLike | None = None,
                     device: torch.device | str = "cpu", check_sha: bool = True, verify: bool = True,
                     memo: dict | None = None, where: str = "the index", rebuild: str = "vop index ... --rebuild"):
    """Rebuild the model of ``checkpoint_info`` (optionally with another path for a moved checkpoint
    or backbone). The checkpoint must be the very file that was indexed (same SHA-256), and so must
    the backbone weights file where the index records it (:func:`verify_model_files`), both checked
    before either is read."""
    from vop.methods.checkpoint import load_checkpoint

    ckpt = Path(checkpoint or info["checkpoint"])
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt}: the index's prompt checkpoint is missing; pass --checkpoint with its new location")
    if check_sha and not verify_model_files(info, checkpoint=ckpt, backbone=backbone, verify=verify, memo=memo,
                                            where=where, rebuild=rebuild):
        if checkpoint_sha256(ckpt) != info["checkpoint_sha256"]:
            raise CheckpointError(
                f"{ckpt}: differs from the checkpoint this index was built with (SHA-256 {info['checkpoint_sha256'][:12]}...): "
                f"its video embeddings would not match; re-run `vop index` with this checkpoint (into a new --out or with --rebuild)")
    bb = backbone if backbone is not None else info.get("backbone")
    model = load_checkpoint(ckpt, bb)
    return model.to(device).eval()
