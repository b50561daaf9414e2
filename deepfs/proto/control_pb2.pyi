from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "uuid", "address", "failure_domain", "capacity_bytes", "free_bytes", "used_bytes", "state", "last_heartbeat_unix", "fragments", "quarantined")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    uuid: str
    address: str
    failure_domain: str
    capacity_bytes: int
    free_bytes: int
    used_bytes: int
    state: str
    last_heartbeat_unix: float
    fragments: int
    quarantined: int
    def __init__(self, node_id: _Optional[int] = ..., uuid: _Optional[str] = ..., address: _Optional[str] = ..., failure_domain: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., state: _Optional[str] = ..., last_heartbeat_unix: _Optional[float] = ..., fragments: _Optional[int] = ..., quarantined: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("uuid", "address", "failure_domain", "capacity_bytes", "free_bytes", "used_bytes")
    UUID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    address: str
    failure_domain: str
    capacity_bytes: int
    free_bytes: int
    used_bytes: int
    def __init__(self, uuid: _Optional[str] = ..., address: _Optional[str] = ..., failure_domain: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("node_id", "epoch", "heartbeat_interval_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    epoch: int
    heartbeat_interval_s: float
    def __init__(self, node_id: _Optional[int] = ..., epoch: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "capacity_bytes", "free_bytes", "used_bytes", "fragments", "quarantined")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    capacity_bytes: int
    free_bytes: int
    used_bytes: int
    fragments: int
    quarantined: int
    def __init__(self, node_id: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., fragments: _Optional[int] = ..., quarantined: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class ClusterMapRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterMap(_message.Message):
    __slots__ = ("epoch", "nodes", "grace_period_s")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    grace_period_s: float
    def __init__(self, epoch: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., grace_period_s: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("map", "default_k", "default_m", "default_stripe_size", "files", "directories", "logical_bytes", "gc_pending", "data_address", "degraded_stripes")
    MAP_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_M_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STRIPE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DIRECTORIES_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    GC_PENDING_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_STRIPES_FIELD_NUMBER: _ClassVar[int]
    map: ClusterMap
    default_k: int
    default_m: int
    default_stripe_size: int
    files: int
    directories: int
    logical_bytes: int
    gc_pending: int
    data_address: str
    degraded_stripes: int
    def __init__(self, map: _Optional[_Union[ClusterMap, _Mapping]] = ..., default_k: _Optional[int] = ..., default_m: _Optional[int] = ..., default_stripe_size: _Optional[int] = ..., files: _Optional[int] = ..., directories: _Optional[int] = ..., logical_bytes: _Optional[int] = ..., gc_pending: _Optional[int] = ..., data_address: _Optional[str] = ..., degraded_stripes: _Optional[int] = ...) -> None: ...
