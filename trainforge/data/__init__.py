"""Data sets (built-in IDX sets and image folders) and the loaders that feed training.

    sources.py   built-in sets: roots, downloads, checksums     idx.py      the IDX file format
    loading.py   load_data(): a set by name or a folder by path    folder.py   image folders: scan, decode, stream
    loaders.py   training batches (device-resident or streamed) and evaluation batches
"""

from .loaders import DeviceLoader, balanced_subset, eval_batches, make_train_loader
from .loading import DataBundle, channel_stats, load_data
from .sources import BUILTIN_DATASETS, ImageSet, data_root, load_builtin

__all__ = ["DataBundle", "DeviceLoader", "ImageSet", "balanced_subset", "channel_stats", "data_root", "eval_batches",
           "load_builtin", "load_data", "make_train_loader", "BUILTIN_DATASETS"]
