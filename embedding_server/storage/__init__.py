"""Storage roots: :mod:`.base` (the interface and local files), :mod:`.remote` (S3, HDFS) and
:mod:`.urls` (``open_storage``: a path or URL to a root), :mod:`.kinds` (``StorageKind``: local,
S3 or HDFS, by the URL's scheme)."""
