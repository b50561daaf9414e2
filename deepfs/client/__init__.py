"""DeepFS client library: ``AsyncClient`` (trio) and the synchronous ``Client``.

Layers, from the top:

- **Public**: ``Client`` / ``File`` (synchronous, any thread) and
  ``AsyncClient`` / ``AsyncFile`` (trio) with path-based calls (``open``,
  ``stat``, ``rename``, ...), ``IOStats``, ``stat_result``. Programs, the
  fsspec and torch adapters use these.
- **Internal, supported for the FUSE client** (``fuse_client/``), which
  addresses everything by inode: ``AsyncClient.meta`` (a ``MetaClient``: one
  typed async method per metadata operation, returning ``Attr``,
  ``DirEntry``, ``Created``, ...), ``AsyncClient.open_inode``,
  ``AsyncClient.open_created`` (a file ``meta.create`` just made, without
  another round trip), ``AsyncClient.start_background`` (work that lives as
  long as the client), ``AsyncClient.ctx`` (this process's ``Caller``) and
  ``AsyncFile.reload`` / ``AsyncFile.attr``. They change with the FUSE client,
  not with a deprecation period.
- **Transport**: ``Transport`` is how the client opens every connection and
  fetches the cluster map; ``TcpTransport`` is the network and the default.
  ``AsyncClient.connect(..., transport=...)`` takes another, e.g. the
  in-process cluster of ``deepfs.testing``. Over TCP, ``Client``'s small
  reads of read-only files skip the trio loop (``_direct``).
- **Credentials**: ``connect(..., key=...)`` / ``Client(..., key=...)`` take
  a ``deepfs.auth.Key`` or a key file (default: ``ClientConfig.key_file``,
  ``$DEEPFS_KEY``, ``~/.config/deepfs/key``). The metadata connection
  presents the key, node connections the ticket HELLO handed out, fragment
  requests the capabilities OPEN and CREATE replies carry (``_caps``).

Everything else (``_stripes``, ``_cluster``, ``_caps``, ``_direct``, ``FileServices``) is private.
"""

from deepfs.client._core import AsyncClient, stat_result
from deepfs.client._file import AsyncFile
from deepfs.client._meta import Attr, Caller, Created, DirEntry, MetaClient, StatFs
from deepfs.client._stripes import IOStats
from deepfs.client._sync import Client, File
from deepfs.client._transport import TcpTransport, Transport
from deepfs.messages import StripeRecord

__all__ = [
    "AsyncClient",
    "AsyncFile",
    "Attr",
    "Caller",
    "Client",
    "Created",
    "DirEntry",
    "File",
    "IOStats",
    "MetaClient",
    "StatFs",
    "StripeRecord",
    "TcpTransport",
    "Transport",
    "stat_result",
]
