from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "uuid", "address", "failure_domain", "capacity_bytes", "free_bytes", "used_bytes", "state", "last_heartbeat_unix", "fragments", "quarantined", "admin_state", "scrub_bytes", "scrub_errors", "scrub_pass_fraction", "scrub_passes")
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
    ADMIN_STATE_FIELD_NUMBER: _ClassVar[int]
    SCRUB_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCRUB_ERRORS_FIELD_NUMBER: _ClassVar[int]
    SCRUB_PASS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SCRUB_PASSES_FIELD_NUMBER: _ClassVar[int]
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
    admin_state: str
    scrub_bytes: int
    scrub_errors: int
    scrub_pass_fraction: float
    scrub_passes: int
    def __init__(self, node_id: _Optional[int] = ..., uuid: _Optional[str] = ..., address: _Optional[str] = ..., failure_domain: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., state: _Optional[str] = ..., last_heartbeat_unix: _Optional[float] = ..., fragments: _Optional[int] = ..., quarantined: _Optional[int] = ..., admin_state: _Optional[str] = ..., scrub_bytes: _Optional[int] = ..., scrub_errors: _Optional[int] = ..., scrub_pass_fraction: _Optional[float] = ..., scrub_passes: _Optional[int] = ...) -> None: ...

class FragmentRef(_message.Message):
    __slots__ = ("ino", "stripe", "version", "slot")
    INO_FIELD_NUMBER: _ClassVar[int]
    STRIPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ino: int
    stripe: int
    version: int
    slot: int
    def __init__(self, ino: _Optional[int] = ..., stripe: _Optional[int] = ..., version: _Optional[int] = ..., slot: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("uuid", "address", "failure_domain", "capacity_bytes", "free_bytes", "used_bytes", "preferred_id")
    UUID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_ID_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    address: str
    failure_domain: str
    capacity_bytes: int
    free_bytes: int
    used_bytes: int
    preferred_id: int
    def __init__(self, uuid: _Optional[str] = ..., address: _Optional[str] = ..., failure_domain: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., preferred_id: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("node_id", "capacity_bytes", "free_bytes", "used_bytes", "fragments", "quarantined", "bad_fragments", "scrub_bytes", "scrub_errors", "scrub_pass_fraction", "scrub_passes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    BAD_FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    SCRUB_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCRUB_ERRORS_FIELD_NUMBER: _ClassVar[int]
    SCRUB_PASS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SCRUB_PASSES_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    capacity_bytes: int
    free_bytes: int
    used_bytes: int
    fragments: int
    quarantined: int
    bad_fragments: _containers.RepeatedCompositeFieldContainer[FragmentRef]
    scrub_bytes: int
    scrub_errors: int
    scrub_pass_fraction: float
    scrub_passes: int
    def __init__(self, node_id: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., fragments: _Optional[int] = ..., quarantined: _Optional[int] = ..., bad_fragments: _Optional[_Iterable[_Union[FragmentRef, _Mapping]]] = ..., scrub_bytes: _Optional[int] = ..., scrub_errors: _Optional[int] = ..., scrub_pass_fraction: _Optional[float] = ..., scrub_passes: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("map", "default_k", "default_m", "default_stripe_size", "files", "directories", "logical_bytes", "gc_pending", "data_address", "degraded_stripes", "stripes_by_lost", "unreadable_stripes", "repair_queue", "repair_bytes_per_s", "repair_eta_s", "repaired_fragments", "incarnation", "scrub_errors", "scrub_progress", "engine", "etcd_members", "leader")
    class StripesByLostEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
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
    STRIPES_BY_LOST_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_STRIPES_FIELD_NUMBER: _ClassVar[int]
    REPAIR_QUEUE_FIELD_NUMBER: _ClassVar[int]
    REPAIR_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    REPAIR_ETA_S_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SCRUB_ERRORS_FIELD_NUMBER: _ClassVar[int]
    SCRUB_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ETCD_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
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
    stripes_by_lost: _containers.ScalarMap[int, int]
    unreadable_stripes: int
    repair_queue: int
    repair_bytes_per_s: float
    repair_eta_s: float
    repaired_fragments: int
    incarnation: int
    scrub_errors: int
    scrub_progress: float
    engine: str
    etcd_members: _containers.RepeatedCompositeFieldContainer[EtcdMember]
    leader: str
    def __init__(self, map: _Optional[_Union[ClusterMap, _Mapping]] = ..., default_k: _Optional[int] = ..., default_m: _Optional[int] = ..., default_stripe_size: _Optional[int] = ..., files: _Optional[int] = ..., directories: _Optional[int] = ..., logical_bytes: _Optional[int] = ..., gc_pending: _Optional[int] = ..., data_address: _Optional[str] = ..., degraded_stripes: _Optional[int] = ..., stripes_by_lost: _Optional[_Mapping[int, int]] = ..., unreadable_stripes: _Optional[int] = ..., repair_queue: _Optional[int] = ..., repair_bytes_per_s: _Optional[float] = ..., repair_eta_s: _Optional[float] = ..., repaired_fragments: _Optional[int] = ..., incarnation: _Optional[int] = ..., scrub_errors: _Optional[int] = ..., scrub_progress: _Optional[float] = ..., engine: _Optional[str] = ..., etcd_members: _Optional[_Iterable[_Union[EtcdMember, _Mapping]]] = ..., leader: _Optional[str] = ...) -> None: ...

class EtcdMember(_message.Message):
    __slots__ = ("endpoint", "is_leader")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    IS_LEADER_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    is_leader: bool
    def __init__(self, endpoint: _Optional[str] = ..., is_leader: _Optional[bool] = ...) -> None: ...

class NodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    def __init__(self, node_id: _Optional[int] = ...) -> None: ...

class FsckRequest(_message.Message):
    __slots__ = ("repair", "max_files")
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    MAX_FILES_FIELD_NUMBER: _ClassVar[int]
    repair: bool
    max_files: int
    def __init__(self, repair: _Optional[bool] = ..., max_files: _Optional[int] = ...) -> None: ...

class FsckFile(_message.Message):
    __slots__ = ("path", "ino", "stripes", "worst_lost")
    PATH_FIELD_NUMBER: _ClassVar[int]
    INO_FIELD_NUMBER: _ClassVar[int]
    STRIPES_FIELD_NUMBER: _ClassVar[int]
    WORST_LOST_FIELD_NUMBER: _ClassVar[int]
    path: str
    ino: int
    stripes: int
    worst_lost: int
    def __init__(self, path: _Optional[str] = ..., ino: _Optional[int] = ..., stripes: _Optional[int] = ..., worst_lost: _Optional[int] = ...) -> None: ...

class FsckReply(_message.Message):
    __slots__ = ("files", "stripes", "degraded_stripes", "unreadable_stripes", "orphaned_fragments", "degraded_files", "unreadable_files", "repair_queue", "stripes_by_lost")
    class StripesByLostEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    FILES_FIELD_NUMBER: _ClassVar[int]
    STRIPES_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_STRIPES_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_STRIPES_FIELD_NUMBER: _ClassVar[int]
    ORPHANED_FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FILES_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_FILES_FIELD_NUMBER: _ClassVar[int]
    REPAIR_QUEUE_FIELD_NUMBER: _ClassVar[int]
    STRIPES_BY_LOST_FIELD_NUMBER: _ClassVar[int]
    files: int
    stripes: int
    degraded_stripes: int
    unreadable_stripes: int
    orphaned_fragments: int
    degraded_files: _containers.RepeatedCompositeFieldContainer[FsckFile]
    unreadable_files: _containers.RepeatedCompositeFieldContainer[FsckFile]
    repair_queue: int
    stripes_by_lost: _containers.ScalarMap[int, int]
    def __init__(self, files: _Optional[int] = ..., stripes: _Optional[int] = ..., degraded_stripes: _Optional[int] = ..., unreadable_stripes: _Optional[int] = ..., orphaned_fragments: _Optional[int] = ..., degraded_files: _Optional[_Iterable[_Union[FsckFile, _Mapping]]] = ..., unreadable_files: _Optional[_Iterable[_Union[FsckFile, _Mapping]]] = ..., repair_queue: _Optional[int] = ..., stripes_by_lost: _Optional[_Mapping[int, int]] = ...) -> None: ...
