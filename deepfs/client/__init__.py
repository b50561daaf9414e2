"""DeepFS client library: ``AsyncClient`` (trio) and the synchronous ``Client``."""

from deepfs.client._core import AsyncClient, stat_result
from deepfs.client._file import AsyncFile
from deepfs.client._stripes import IOStats, StripeRecord
from deepfs.client._sync import Client, File

__all__ = ["AsyncClient", "AsyncFile", "Client", "File", "IOStats", "StripeRecord", "stat_result"]
