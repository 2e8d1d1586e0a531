"""Video data: frame-exact decoding, datasets of five formats, loaders, the synthetic world.

Typical use::

    from vop.data import get_dataset, build_loader, to_model_input
    train = get_dataset("msrvtt", root, "9k", frames=12, size=224)        # random frame per segment
    loader = build_loader(train, batch_size=32, num_workers=4, seed=0)    # shuffled, seeded epochs
    for batch in loader:                                                   # batch["video"]: uint8 (B, F, 3, S, S)
        draws = augment_draws(seed, epoch, batch["index"])                 # per sample: (seed, epoch, index)
        x = to_model_input(batch["video"].to(device), train=True, draws=draws)  # float, CLIP-normalised
        texts = batch["text"]

    test = get_dataset("msrvtt", root, "test")                             # middle frame per segment
    gallery = build_loader(test.video_dataset(), batch_size=64)            # one item per unique video
    test.captions, test.text_to_video                                      # queries and their video
"""
from vop.data.cache import build_cache
from vop.data.dataset import (
    EpochSampler,
    FailedSample,
    Record,
    VideoDataset,
    VideoLoader,
    VideoTextDataset,
    build_loader,
    collate,
)
from vop.data.decode import VideoInfo, VideoReader, check_video, decode_frames, load_frames, sample_indices, video_info
from vop.data.formats import FORMATS, load_records
from vop.data.loading import get_dataset
from vop.data.synth import generate_world, heldout_subset, load_stills, make_stills, temporal_subset
from vop.data.transforms import (CLIP_MEAN, CLIP_STD, Preprocess, augment, augment_draws, normalize, resize_center_crop,
                                  resize_frames, to_model_input)
from vop.data.verify import VerifyReport, read_manifest, verify, write_manifest

__all__ = [
    "get_dataset", "load_records", "FORMATS", "Record", "VideoTextDataset", "VideoDataset", "FailedSample",
    "collate", "EpochSampler", "VideoLoader", "build_loader",
    "VideoReader", "VideoInfo", "sample_indices", "load_frames", "decode_frames", "video_info", "check_video",
    "CLIP_MEAN", "CLIP_STD", "Preprocess", "resize_center_crop", "resize_frames", "normalize", "augment", "augment_draws", "to_model_input",
    "verify", "VerifyReport", "read_manifest", "write_manifest", "build_cache",
    "generate_world", "make_stills", "load_stills", "temporal_subset", "heldout_subset",
]
