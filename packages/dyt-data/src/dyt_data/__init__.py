"""Data plumbing shared by the recipes, kept out of the kernel package (``dyt``):

* :mod:`dyt_data.cache`: ``$DYT_CACHE`` (default ``~/.cache/dyt``), where every recipe keeps data,
  and its folders made with a one-line reason where they cannot be;
* :mod:`dyt_data.debian`: Debian packages unpacked into that cache (no install, no root);
* :mod:`dyt_data.processes`: how many worker processes a data step gets;
* :mod:`dyt_data.walk`: the files of a data folder, as every recipe lists them;
* :mod:`dyt_data.shards`: token streams on disk as memory-mapped shards with a JSON index, written
  in constant memory and resumable after a kill.
"""

from .cache import CacheFolderUnusable, cache_folder, cache_root, disk_full, file_key, file_sha256
from .debian import (
    BuiltinDataUnavailable,
    failure_reason,
    reported_as,
    unpack,
    unpacked_root,
    unpacked_versions,
)
from .processes import worker_processes
from .walk import FolderFiles, files_by_suffix

__all__ = ["BuiltinDataUnavailable", "CacheFolderUnusable", "FolderFiles", "files_by_suffix", "cache_folder", "cache_root", "disk_full", "failure_reason", "file_key", "file_sha256", "reported_as", "unpack", "unpacked_root", "unpacked_versions",
           "worker_processes"]
