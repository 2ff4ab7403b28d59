"""Data: image datasets (class folders, Kaggle layout, unlabeled folders, CSV), robust decoding, the built-in
synthetic brain-MRI phantoms, DINOv2 multi-crop augmentation, iBOT block masking and collate, an infinite
sharded resumable sampler, and the loader builders that read the config.

Names are imported lazily (PEP 562) so that ``import dinov2_repro.data`` does not pull in torchvision.
"""

from importlib import import_module

_EXPORTS = {
    "IMG_EXTENSIONS": "decode", "ImageDecodeError": "decode", "decode_image_file": "decode",
    "decode_with_pil": "decode", "rescale_to_uint8": "decode",
    "ImageFileDataset": "datasets", "ClassFolderDataset": "datasets", "UnlabeledFolderDataset": "datasets",
    "CsvDataset": "datasets", "DatasetSubset": "datasets", "open_labeled_dataset": "datasets",
    "stratified_split": "datasets", "stratified_subset": "datasets", "KAGGLE_CLASSES": "datasets",
    "generate_dataset": "synthetic", "render_phantom": "synthetic", "PhantomRenderer": "synthetic",
    "MultiCropAugmentation": "augmentations", "DataAugmentationDINO": "augmentations",
    "build_multicrop_augmentation": "augmentations", "BLUR_PROBABILITIES": "augmentations",
    "IMAGENET_MEAN": "augmentations", "IMAGENET_STD": "augmentations",
    "MaskingGenerator": "masking",
    "collate_data_and_cast": "collate", "SSLCollate": "collate",
    "InfiniteShardedSampler": "samplers",
    "MultiCropDataset": "loaders", "WorkerSeeder": "loaders", "make_data_loader": "loaders",
    "build_image_dataset": "loaders", "build_ssl_dataset": "loaders", "build_ssl_data_loader": "loaders",
    "build_mask_generator": "loaders", "sample_seed": "loaders",
    "compute_mean_std": "stats",
    "ConcatImageDataset": "sources", "manifest_dataset": "sources", "mixed_folder_dataset": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
