"""Storage: volumes (precomputed via CloudVolume, zarr v3) and object stores (directory, GCS).

Heavy libraries (cloudvolume, zarr, google-cloud-storage) are imported only when a
volume or store of that kind is opened.

Layers, each importing only the ones above it in this list: errors and names
(``chunkflow.errors``, ``names.py``); the interfaces (``objects.py``: ObjectStore,
``volumes.py``: Volume) and URL parsing (``volume_urls.py``); the GCS helpers and the
formats (``gcs*.py``, ``precomputed.py`` with ``precomputed_files.py``, ``sharding.py``, ``zarr_volume.py``); the factories
that know every kind (``stores.py``: open_store, ``volume_factory.py``: open/create_volume).
"""
from chunkflow.errors import StorageError
from chunkflow.storage.names import validate_name
from chunkflow.storage.objects import DirectoryStore, ObjectStore
from chunkflow.storage.stores import open_store
from chunkflow.storage.volume_factory import create_volume, open_volume
from chunkflow.storage.volumes import Volume

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
