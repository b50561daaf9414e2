"""Storage engines behind ``metadata.store.MetaStore``: each implements ``metadata.store.Engine``.

``lmdb_engine``: the embedded default (one process, one file, group commit).
``etcd_engine``: many stateless metadata servers over an etcd cluster.
"""
