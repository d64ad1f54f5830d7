"""Storage: volumes (precomputed via CloudVolume, zarr v3) and object stores (directory, GCS).

Heavy libraries (cloudvolume, zarr, google-cloud-storage) are imported only when a
volume or store of that kind is opened.
"""
from chunkflow.storage.objects import DirectoryStore, ObjectStore, open_store, validate_name
from chunkflow.storage.volumes import StorageError, Volume, create_volume, open_volume

__all__ = [
    "DirectoryStore",
    "ObjectStore",
    "StorageError",
    "Volume",
    "create_volume",
    "open_store",
    "open_volume",
    "validate_name",
]
