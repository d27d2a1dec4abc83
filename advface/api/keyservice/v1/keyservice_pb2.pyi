from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HandshakeRequest(_message.Message):
    __slots__ = ("fingerprint",)
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    def __init__(self, fingerprint: _Optional[str] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("fingerprint", "metric", "top_k_max", "slots")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    TOP_K_MAX_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    metric: str
    top_k_max: int
    slots: int
    def __init__(self, fingerprint: _Optional[str] = ..., metric: _Optional[str] = ..., top_k_max: _Optional[int] = ..., slots: _Optional[int] = ...) -> None: ...

class RequestItem(_message.Message):
    __slots__ = ("ciphertext", "slots", "groups")
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    slots: _containers.RepeatedScalarFieldContainer[int]
    groups: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ciphertext: _Optional[bytes] = ..., slots: _Optional[_Iterable[int]] = ..., groups: _Optional[_Iterable[int]] = ...) -> None: ...

class BoundRequest(_message.Message):
    __slots__ = ("op", "tenant", "fingerprint", "nonce", "issued_ms", "top_k", "items", "mac", "target")
    OP_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_MS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    op: str
    tenant: str
    fingerprint: str
    nonce: str
    issued_ms: int
    top_k: int
    items: _containers.RepeatedCompositeFieldContainer[RequestItem]
    mac: str
    target: str
    def __init__(self, op: _Optional[str] = ..., tenant: _Optional[str] = ..., fingerprint: _Optional[str] = ..., nonce: _Optional[str] = ..., issued_ms: _Optional[int] = ..., top_k: _Optional[int] = ..., items: _Optional[_Iterable[_Union[RequestItem, _Mapping]]] = ..., mac: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("item", "slot", "score")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item: int
    slot: int
    score: float
    def __init__(self, item: _Optional[int] = ..., slot: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class VerifyReply(_message.Message):
    __slots__ = ("match", "best")
    MATCH_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    match: bool
    best: Decision
    def __init__(self, match: _Optional[bool] = ..., best: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class IdentifyReply(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Decision]
    def __init__(self, candidates: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ...) -> None: ...

class RefreshReply(_message.Message):
    __slots__ = ("columns",)
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, columns: _Optional[_Iterable[bytes]] = ...) -> None: ...
