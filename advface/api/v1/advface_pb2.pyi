import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Face(_message.Message):
    __slots__ = ("embedding", "image")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    embedding: Embedding
    image: bytes
    def __init__(self, embedding: _Optional[_Union[Embedding, _Mapping]] = ..., image: _Optional[bytes] = ...) -> None: ...

class ProtectRequest(_message.Message):
    __slots__ = ("embeddings", "tenant")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    tenant: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., tenant: _Optional[str] = ...) -> None: ...

class ProtectResponse(_message.Message):
    __slots__ = ("embeddings", "protection")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    protection: ProtectionInfo
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., protection: _Optional[_Union[ProtectionInfo, _Mapping]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("tenant", "subject_id", "face", "metadata", "replace")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject_id: str
    face: Face
    metadata: _containers.ScalarMap[str, str]
    replace: bool
    def __init__(self, tenant: _Optional[str] = ..., subject_id: _Optional[str] = ..., face: _Optional[_Union[Face, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., replace: _Optional[bool] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("subject_id", "template_ids", "protected")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_IDS_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    template_ids: _containers.RepeatedScalarFieldContainer[str]
    protected: bool
    def __init__(self, subject_id: _Optional[str] = ..., template_ids: _Optional[_Iterable[str]] = ..., protected: _Optional[bool] = ...) -> None: ...

class EnrollItem(_message.Message):
    __slots__ = ("subject_id", "face", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    face: Face
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, subject_id: _Optional[str] = ..., face: _Optional[_Union[Face, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EnrollBatchRequest(_message.Message):
    __slots__ = ("tenant", "items")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    items: _containers.RepeatedCompositeFieldContainer[EnrollItem]
    def __init__(self, tenant: _Optional[str] = ..., items: _Optional[_Iterable[_Union[EnrollItem, _Mapping]]] = ...) -> None: ...

class EnrollBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EnrollResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[EnrollResponse, _Mapping]]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("tenant", "subject_id", "probe")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject_id: str
    probe: Face
    def __init__(self, tenant: _Optional[str] = ..., subject_id: _Optional[str] = ..., probe: _Optional[_Union[Face, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("match", "score", "threshold", "template_id")
    MATCH_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    match: bool
    score: float
    threshold: float
    template_id: str
    def __init__(self, match: _Optional[bool] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., template_id: _Optional[str] = ...) -> None: ...

class IdentifyRequest(_message.Message):
    __slots__ = ("tenant", "probe", "top_k")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    probe: Face
    top_k: int
    def __init__(self, tenant: _Optional[str] = ..., probe: _Optional[_Union[Face, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("subject_id", "template_id", "score", "match")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    template_id: str
    score: float
    match: bool
    def __init__(self, subject_id: _Optional[str] = ..., template_id: _Optional[str] = ..., score: _Optional[float] = ..., match: _Optional[bool] = ...) -> None: ...

class IdentifyResponse(_message.Message):
    __slots__ = ("matches", "threshold")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    threshold: float
    def __init__(self, matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., threshold: _Optional[float] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("tenant", "subject_id", "template_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject_id: str
    template_id: str
    def __init__(self, tenant: _Optional[str] = ..., subject_id: _Optional[str] = ..., template_id: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "subject_id")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    subject_id: str
    def __init__(self, deleted: _Optional[int] = ..., subject_id: _Optional[str] = ...) -> None: ...

class GetSubjectRequest(_message.Message):
    __slots__ = ("tenant", "subject_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject_id: str
    def __init__(self, tenant: _Optional[str] = ..., subject_id: _Optional[str] = ...) -> None: ...

class Subject(_message.Message):
    __slots__ = ("subject_id", "metadata", "template_ids", "created_at")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    metadata: _containers.ScalarMap[str, str]
    template_ids: _containers.RepeatedScalarFieldContainer[str]
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, subject_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., template_ids: _Optional[_Iterable[str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListSubjectsRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSubjectsResponse(_message.Message):
    __slots__ = ("subjects", "next_page_token")
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    subjects: _containers.RepeatedCompositeFieldContainer[Subject]
    next_page_token: str
    def __init__(self, subjects: _Optional[_Iterable[_Union[Subject, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class EncoderInfo(_message.Message):
    __slots__ = ("name", "dim", "metric", "fingerprint", "detector", "face_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    FACE_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    metric: str
    fingerprint: str
    detector: str
    face_policy: str
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., metric: _Optional[str] = ..., fingerprint: _Optional[str] = ..., detector: _Optional[str] = ..., face_policy: _Optional[str] = ...) -> None: ...

class ProtectionInfo(_message.Message):
    __slots__ = ("enabled", "method", "rel_l2", "steps", "seed", "shadow_model", "shadow_sha256", "lanes", "linf", "keyed_transform")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REL_L2_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_MODEL_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SHA256_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    LINF_FIELD_NUMBER: _ClassVar[int]
    KEYED_TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    method: str
    rel_l2: float
    steps: int
    seed: int
    shadow_model: str
    shadow_sha256: str
    lanes: int
    linf: float
    keyed_transform: KeyedTransformInfo
    def __init__(self, enabled: _Optional[bool] = ..., method: _Optional[str] = ..., rel_l2: _Optional[float] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., shadow_model: _Optional[str] = ..., shadow_sha256: _Optional[str] = ..., lanes: _Optional[int] = ..., linf: _Optional[float] = ..., keyed_transform: _Optional[_Union[KeyedTransformInfo, _Mapping]] = ...) -> None: ...

class KeyedTransformInfo(_message.Message):
    __slots__ = ("enabled", "version", "norm", "key_id")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    version: int
    norm: float
    key_id: str
    def __init__(self, enabled: _Optional[bool] = ..., version: _Optional[int] = ..., norm: _Optional[float] = ..., key_id: _Optional[str] = ...) -> None: ...

class ThresholdInfo(_message.Message):
    __slots__ = ("value", "source", "description")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    value: float
    source: str
    description: str
    def __init__(self, value: _Optional[float] = ..., source: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Versions(_message.Message):
    __slots__ = ("advface", "api", "grpc", "store_backend")
    ADVFACE_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    STORE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    advface: str
    api: str
    grpc: str
    store_backend: str
    def __init__(self, advface: _Optional[str] = ..., api: _Optional[str] = ..., grpc: _Optional[str] = ..., store_backend: _Optional[str] = ...) -> None: ...

class Counts(_message.Message):
    __slots__ = ("tenant_templates", "tenant_subjects", "total_templates", "total_subjects")
    TENANT_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    TENANT_SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    tenant_templates: int
    tenant_subjects: int
    total_templates: int
    total_subjects: int
    def __init__(self, tenant_templates: _Optional[int] = ..., tenant_subjects: _Optional[int] = ..., total_templates: _Optional[int] = ..., total_subjects: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch", "top_k_max", "max_receive_bytes", "max_send_bytes", "max_id_chars", "max_image_pixels", "max_protect_image_pixels", "max_metadata_keys", "max_metadata_key_chars", "max_metadata_value_chars", "min_embedding_norm", "max_embedding_norm", "rate_per_second", "max_in_flight")
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    TOP_K_MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEND_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ID_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROTECT_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_METADATA_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_METADATA_KEY_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_METADATA_VALUE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MIN_EMBEDDING_NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_EMBEDDING_NORM_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    max_batch: int
    top_k_max: int
    max_receive_bytes: int
    max_send_bytes: int
    max_id_chars: int
    max_image_pixels: int
    max_protect_image_pixels: int
    max_metadata_keys: int
    max_metadata_key_chars: int
    max_metadata_value_chars: int
    min_embedding_norm: float
    max_embedding_norm: float
    rate_per_second: float
    max_in_flight: int
    def __init__(self, max_batch: _Optional[int] = ..., top_k_max: _Optional[int] = ..., max_receive_bytes: _Optional[int] = ..., max_send_bytes: _Optional[int] = ..., max_id_chars: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_protect_image_pixels: _Optional[int] = ..., max_metadata_keys: _Optional[int] = ..., max_metadata_key_chars: _Optional[int] = ..., max_metadata_value_chars: _Optional[int] = ..., min_embedding_norm: _Optional[float] = ..., max_embedding_norm: _Optional[float] = ..., rate_per_second: _Optional[float] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("encoder", "protection", "threshold", "versions", "counts", "limits")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    encoder: EncoderInfo
    protection: ProtectionInfo
    threshold: ThresholdInfo
    versions: Versions
    counts: Counts
    limits: Limits
    def __init__(self, encoder: _Optional[_Union[EncoderInfo, _Mapping]] = ..., protection: _Optional[_Union[ProtectionInfo, _Mapping]] = ..., threshold: _Optional[_Union[ThresholdInfo, _Mapping]] = ..., versions: _Optional[_Union[Versions, _Mapping]] = ..., counts: _Optional[_Union[Counts, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class ProtectImageRequest(_message.Message):
    __slots__ = ("image", "epsilon", "steps", "seed", "target_similarity", "guidance")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TARGET_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    epsilon: float
    steps: int
    seed: int
    target_similarity: float
    guidance: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image: _Optional[bytes] = ..., epsilon: _Optional[float] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., target_similarity: _Optional[float] = ..., guidance: _Optional[_Iterable[str]] = ...) -> None: ...

class EncoderSimilarity(_message.Message):
    __slots__ = ("encoder", "cosine_after", "cosine_random", "has_threshold", "score_after", "matched_after")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    COSINE_AFTER_FIELD_NUMBER: _ClassVar[int]
    COSINE_RANDOM_FIELD_NUMBER: _ClassVar[int]
    HAS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SCORE_AFTER_FIELD_NUMBER: _ClassVar[int]
    MATCHED_AFTER_FIELD_NUMBER: _ClassVar[int]
    encoder: str
    cosine_after: float
    cosine_random: float
    has_threshold: bool
    score_after: float
    matched_after: bool
    def __init__(self, encoder: _Optional[str] = ..., cosine_after: _Optional[float] = ..., cosine_random: _Optional[float] = ..., has_threshold: _Optional[bool] = ..., score_after: _Optional[float] = ..., matched_after: _Optional[bool] = ...) -> None: ...

class ImageProtectionReport(_message.Message):
    __slots__ = ("similarity", "psnr", "ssim", "linf_levels", "epsilon", "steps", "seconds", "width", "height", "grayscale", "notes", "guidance")
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    PSNR_FIELD_NUMBER: _ClassVar[int]
    SSIM_FIELD_NUMBER: _ClassVar[int]
    LINF_LEVELS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRAYSCALE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    similarity: _containers.RepeatedCompositeFieldContainer[EncoderSimilarity]
    psnr: float
    ssim: float
    linf_levels: int
    epsilon: float
    steps: int
    seconds: float
    width: int
    height: int
    grayscale: bool
    notes: _containers.RepeatedScalarFieldContainer[str]
    guidance: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, similarity: _Optional[_Iterable[_Union[EncoderSimilarity, _Mapping]]] = ..., psnr: _Optional[float] = ..., ssim: _Optional[float] = ..., linf_levels: _Optional[int] = ..., epsilon: _Optional[float] = ..., steps: _Optional[int] = ..., seconds: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., grayscale: _Optional[bool] = ..., notes: _Optional[_Iterable[str]] = ..., guidance: _Optional[_Iterable[str]] = ...) -> None: ...

class ProtectImageResponse(_message.Message):
    __slots__ = ("image", "report")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    report: ImageProtectionReport
    def __init__(self, image: _Optional[bytes] = ..., report: _Optional[_Union[ImageProtectionReport, _Mapping]] = ...) -> None: ...

class RotateKeyPairRequest(_message.Message):
    __slots__ = ("new_keys_dir", "blocks_per_second")
    NEW_KEYS_DIR_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    new_keys_dir: str
    blocks_per_second: float
    def __init__(self, new_keys_dir: _Optional[str] = ..., blocks_per_second: _Optional[float] = ...) -> None: ...

class EraseNowRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MaintenanceStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetAttemptsRequest(_message.Message):
    __slots__ = ("tenant", "subject_id", "caller")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject_id: str
    caller: str
    def __init__(self, tenant: _Optional[str] = ..., subject_id: _Optional[str] = ..., caller: _Optional[str] = ...) -> None: ...

class ResetAttemptsResponse(_message.Message):
    __slots__ = ("cleared",)
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    cleared: bool
    def __init__(self, cleared: _Optional[bool] = ...) -> None: ...

class MaintenanceJob(_message.Message):
    __slots__ = ("operation", "state", "blocks_done", "blocks_total", "blocks_this_job", "last_error", "target_fingerprint", "new_keys_dir", "fingerprint", "erased", "pending", "started_at", "finished_at", "already_running", "unfinished_rotation")
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_DONE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_THIS_JOB_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NEW_KEYS_DIR_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ERASED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ALREADY_RUNNING_FIELD_NUMBER: _ClassVar[int]
    UNFINISHED_ROTATION_FIELD_NUMBER: _ClassVar[int]
    operation: str
    state: str
    blocks_done: int
    blocks_total: int
    blocks_this_job: int
    last_error: str
    target_fingerprint: str
    new_keys_dir: str
    fingerprint: str
    erased: int
    pending: int
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    already_running: bool
    unfinished_rotation: str
    def __init__(self, operation: _Optional[str] = ..., state: _Optional[str] = ..., blocks_done: _Optional[int] = ..., blocks_total: _Optional[int] = ..., blocks_this_job: _Optional[int] = ..., last_error: _Optional[str] = ..., target_fingerprint: _Optional[str] = ..., new_keys_dir: _Optional[str] = ..., fingerprint: _Optional[str] = ..., erased: _Optional[int] = ..., pending: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., already_running: _Optional[bool] = ..., unfinished_rotation: _Optional[str] = ...) -> None: ...
