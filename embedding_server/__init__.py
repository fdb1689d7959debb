"""Sparse state and everything about it, in five sub-packages imported only downward.

============  ==========================================================================
layer         what it holds
============  ==========================================================================
``storage``   where files live: local paths, ``s3://``, ``hdfs://`` (atomic publish, listing)
``core``      configs and their schema, errors, the batch format and its codec, the dense
              model spec, sparse optimizer settings
``store``     the embedding store, its compiled kernels, memory and CPU placement
``modelroot`` packets, checkpoints, the incremental publisher and the hot-loading follower
``rpc``       the gRPC service, clients (in-process, remote, sharded), wire format, local
              socket, replicas, security, metrics, the local server launcher
``cli``       (a module) the ``ctrserve embedding-server`` family of commands
============  ==========================================================================

A module may import from its own sub-package and from the layers above it in this table, never
from one below it, and nothing of this project outside ``embedding_server`` except the
generated ``protos``. ``tests/test_imports.py`` checks this from the code.
"""
