"""`vop data ...` commands (verify, cache, synth, info)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vop.data.formats import FORMATS, format_names, get_format

data_app = typer.Typer(help="Datasets: verify, cache frames, generate the synthetic world.", no_args_is_help=True)


def _split_help() -> str:
    """``Split (default: test; val_1 for activitynet; ...)``: each format's ``default_split``."""
    other = [f"{f.default_split} for {f.name}" for f in FORMATS.values() if f.default_split != "test"]
    return f"Split (default: {'; '.join(['test', *other])})."


_DATASET = typer.Option(..., "--dataset", "-d", help=f"{format_names()}.")
_ROOT = typer.Option(..., "--root", "-r", help="Dataset folder (annotations; videos in ROOT/videos or ROOT).")
_SPLIT = typer.Option(None, "--split", "-s", help=_split_help())
_VIDEOS = typer.Option(None, "--videos", help="Videos folder, if not ROOT/videos or ROOT.")
_ANN = typer.Option(None, "--annotations", help="Annotation file (collection), if not ROOT/captions.jsonl|csv.")
_WORKERS = typer.Option(0, "--workers", "-j", help="Worker processes.")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("verify")
def verify_cmd(
    dataset: str = _DATASET,
    root: Path = _ROOT,
    split: Optional[str] = _SPLIT,
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any video is missing or undecodable."),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", help="Where to write the manifest (default ROOT/vop-verify-DATASET-SPLIT.json)."),
    videos: Optional[Path] = _VIDEOS,
    annotations: Optional[Path] = _ANN,
    workers: int = _WORKERS,
    frames: Optional[int] = typer.Option(
        None, "--frames", "-f", help="Frames per video that training reads (default 12; 64 for paragraphs)."),
) -> None:
    """Check that every video of a split exists and that the frames training and evaluation read
    decode (test sampling and a train draw); write a manifest of the bad ones."""
    from vop import limits
    from vop.data.files import summarize_skipped
    from vop.data.verify import manifest_path, verify, write_manifest

    limits.check_options(("--workers", workers, 0, limits.MAX_WORKERS),
                         ("--frames", frames, 1, limits.MAX_FRAMES, limits.WHY_FRAMES))
    split = split or get_format(dataset).default_split
    report = verify(dataset, root, split, videos_dir=videos, annotations=annotations, num_workers=workers,
                    progress=True, frames=frames)
    out = write_manifest(report, manifest or manifest_path(root, dataset, report.split))
    typer.echo(f"{dataset} {report.split}: {report.samples} samples, {report.videos} videos, "
               f"{len(report.missing)} missing, {len(report.undecodable)} undecodable "
               f"(decoded per video: first, last, {report.frames} test-sampled frames, a train draw)")
    if report.skipped:
        typer.echo(f"  left out of the videos folder walk ({len(report.skipped)}):")
        for line in summarize_skipped([(Path(b["path"]), b["reason"]) for b in report.skipped]):
            typer.echo(f"    {line}")
    for bad in report.missing[:20]:
        typer.echo(f"  missing: {bad['path']}")
    for bad in report.undecodable[:20]:
        typer.echo(f"  undecodable: {bad['error']}")
    shown = min(20, len(report.missing)) + min(20, len(report.undecodable))
    if len(report.missing) + len(report.undecodable) > shown:
        typer.echo("  ... (all of them are in the manifest)")
    typer.echo(f"manifest: {out}")
    if strict and not report.ok:
        raise typer.Exit(1)


@data_app.command("cache")
def cache_cmd(
    dataset: str = _DATASET,
    root: Path = _ROOT,
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder."),
    split: Optional[str] = _SPLIT,
    frames: Optional[int] = typer.Option(None, "--frames", "-f", help="Frames per video (default 12; 64 for paragraphs)."),
    size: int = typer.Option(224, "--size", help="Side of the stored square frames."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Resize frames as this architecture was trained "
                                           "(e.g. PE-Core-B-16: squash, bilinear); default: CLIP's shortest side + "
                                           "centre crop, bicubic."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Re-decode videos already cached."),
    videos: Optional[Path] = _VIDEOS,
    annotations: Optional[Path] = _ANN,
    workers: int = _WORKERS,
) -> None:
    """Store the test-sampled frames of every video, for fast evaluation (--cache-dir)."""
    from vop import limits
    from vop.data.cache import build_cache
    from vop.data.loading import get_dataset

    limits.check_options(("--workers", workers, 0, limits.MAX_WORKERS),
                         ("--frames", frames, 1, limits.MAX_FRAMES, limits.WHY_FRAMES),
                         ("--size", size, 1, limits.MAX_IMAGE_SIZE, limits.WHY_IMAGE))
    split = split or get_format(dataset).default_split
    preprocess = None
    if backbone is not None:
        from vop.backbone.config import get_arch

        preprocess = get_arch(backbone).vision.preprocess.with_size(size)
    ds = get_dataset(dataset, root, split, frames=frames, size=size, train=False, videos_dir=videos,
                     annotations=annotations, preprocess=preprocess)
    report = build_cache(ds, out, num_workers=workers, overwrite=overwrite)
    typer.echo(f"{report.directory}: {report.written} written, {report.existing} already cached, "
               f"{len(report.failed)} failed")
    for err in list(report.failed.values())[:20]:
        typer.echo(f"  failed: {err}")


@data_app.command("synth")
def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed: same annotations and frames)."),
    size: str = typer.Option("small", "--size", help="smoke, small or full."),
) -> None:
    """Generate the synthetic world: mp4 videos, captions.jsonl (collection format), stills."""
    from vop import limits
    from vop.data.synth import WORLD_SIZES, generate_world
    from vop.errors import ConfigError

    limits.check_options(("--seed", seed, 0, limits.INT64_MAX))
    if size not in WORLD_SIZES:
        raise ConfigError(f"--size {size!r}: choose one of {', '.join(WORLD_SIZES)}")
    world = generate_world(out, seed=seed, size=size, progress=True)
    c = world["counts"]
    typer.echo(f"{out}: train {c['train']['videos']} videos / {c['train']['captions']} captions, "
               f"val {c['val']['videos']}, test {c['test']['videos']} "
               f"({c['test']['temporal_videos']} in twin pairs, {c['test']['heldout_videos']} held-out), "
               f"{world['stills']} stills")
    typer.echo(f"load with: get_dataset('collection', '{out}', 'train' | 'val' | 'test')")


@data_app.command("info")
def info_cmd(video: Path = typer.Argument(..., help="A video file.")) -> None:
    """Exact frame count, frame rate, duration and size of a video."""
    from vop.data.decode import video_info

    i = video_info(video)
    extra = f", rotated {i.rotation} degrees" if i.rotation else ""
    extra += ", mirrored" if i.mirrored else ""
    extra += f", video stream {i.stream}" if i.stream else ""
    typer.echo(f"{i.path}: {i.num_frames} frames, {i.fps:.3f} fps, {i.duration:.2f} s, {i.width}x{i.height}, {i.codec}"
               f"{extra} (decoding: {i.mode})")
