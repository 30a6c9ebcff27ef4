from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LabelSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_SOURCE_UNSPECIFIED: _ClassVar[LabelSource]
    HUMAN: _ClassVar[LabelSource]
    PREDICTED: _ClassVar[LabelSource]
LABEL_SOURCE_UNSPECIFIED: LabelSource
HUMAN: LabelSource
PREDICTED: LabelSource

class Vector(_message.Message):
    __slots__ = ("values", "data")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    data: bytes
    def __init__(self, values: _Optional[_Iterable[float]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "packed")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    packed: bool
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., packed: _Optional[bool] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dim")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Vector]
    dim: int
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., dim: _Optional[int] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "image", "embedding", "label", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    embedding: Vector
    label: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., embedding: _Optional[_Union[Vector, _Mapping]] = ..., label: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("id", "index", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    code: int
    message: str
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class UpsertAck(_message.Message):
    __slots__ = ("sequence", "upserted", "failed", "errors")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    upserted: int
    failed: int
    errors: _containers.RepeatedCompositeFieldContainer[ItemError]
    def __init__(self, sequence: _Optional[int] = ..., upserted: _Optional[int] = ..., failed: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[ItemError, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids", "ignore_missing")
    IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_MISSING_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    ignore_missing: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., ignore_missing: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class LabelAssignment(_message.Message):
    __slots__ = ("id", "label", "confidence")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    confidence: float
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class SetLabelsRequest(_message.Message):
    __slots__ = ("assignments", "source")
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[LabelAssignment]
    source: LabelSource
    def __init__(self, assignments: _Optional[_Iterable[_Union[LabelAssignment, _Mapping]]] = ..., source: _Optional[_Union[LabelSource, str]] = ...) -> None: ...

class SetLabelsResponse(_message.Message):
    __slots__ = ("updated",)
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    updated: int
    def __init__(self, updated: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("ids", "include_embedding", "ignore_missing", "packed")
    IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    IGNORE_MISSING_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    include_embedding: bool
    ignore_missing: bool
    packed: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., include_embedding: _Optional[bool] = ..., ignore_missing: _Optional[bool] = ..., packed: _Optional[bool] = ...) -> None: ...

class StoredItem(_message.Message):
    __slots__ = ("id", "label", "predicted_label", "predicted_confidence", "metadata", "embedding")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    predicted_label: str
    predicted_confidence: float
    metadata: _containers.ScalarMap[str, str]
    embedding: Vector
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., predicted_label: _Optional[str] = ..., predicted_confidence: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., embedding: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StoredItem]
    def __init__(self, items: _Optional[_Iterable[_Union[StoredItem, _Mapping]]] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("image", "id", "vector")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    id: str
    vector: Vector
    def __init__(self, image: _Optional[bytes] = ..., id: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("id", "score", "label", "predicted_label", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    label: str
    predicted_label: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., label: _Optional[str] = ..., predicted_label: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "k", "labels", "min_score", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    query: Query
    k: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    min_score: float
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., k: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., min_score: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("neighbors",)
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("query", "k", "tau", "neighbors")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    query: Query
    k: int
    tau: float
    neighbors: int
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., k: _Optional[int] = ..., tau: _Optional[float] = ..., neighbors: _Optional[int] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("queries", "k", "labels", "min_score", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    k: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    min_score: float
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., k: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., min_score: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("queries", "k", "tau", "neighbors")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    k: int
    tau: float
    neighbors: int
    def __init__(self, queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., k: _Optional[int] = ..., tau: _Optional[float] = ..., neighbors: _Optional[int] = ...) -> None: ...

class ClassifyBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyResponse, _Mapping]]] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("label", "confidence", "scores", "neighbors")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    label: str
    confidence: float
    scores: _containers.RepeatedCompositeFieldContainer[ClassScore]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, label: _Optional[str] = ..., confidence: _Optional[float] = ..., scores: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class LabelCorpusRequest(_message.Message):
    __slots__ = ("k", "tau", "min_confidence", "apply")
    K_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    APPLY_FIELD_NUMBER: _ClassVar[int]
    k: int
    tau: float
    min_confidence: float
    apply: bool
    def __init__(self, k: _Optional[int] = ..., tau: _Optional[float] = ..., min_confidence: _Optional[float] = ..., apply: _Optional[bool] = ...) -> None: ...

class LabelProposal(_message.Message):
    __slots__ = ("id", "label", "confidence")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    confidence: float
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class SuggestRequest(_message.Message):
    __slots__ = ("n", "seed", "sample", "k", "tau", "uncertain_from")
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    UNCERTAIN_FROM_FIELD_NUMBER: _ClassVar[int]
    n: int
    seed: int
    sample: int
    k: int
    tau: float
    uncertain_from: int
    def __init__(self, n: _Optional[int] = ..., seed: _Optional[int] = ..., sample: _Optional[int] = ..., k: _Optional[int] = ..., tau: _Optional[float] = ..., uncertain_from: _Optional[int] = ...) -> None: ...

class Suggestion(_message.Message):
    __slots__ = ("id", "reason", "score", "predicted_label", "margin", "metadata")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPICAL: _ClassVar[Suggestion.Reason]
        UNCERTAIN: _ClassVar[Suggestion.Reason]
    TYPICAL: Suggestion.Reason
    UNCERTAIN: Suggestion.Reason
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: Suggestion.Reason
    score: float
    predicted_label: str
    margin: float
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[_Union[Suggestion.Reason, str]] = ..., score: _Optional[float] = ..., predicted_label: _Optional[str] = ..., margin: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SuggestResponse(_message.Message):
    __slots__ = ("suggestions", "candidates", "clusters")
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    suggestions: _containers.RepeatedCompositeFieldContainer[Suggestion]
    candidates: int
    clusters: int
    def __init__(self, suggestions: _Optional[_Iterable[_Union[Suggestion, _Mapping]]] = ..., candidates: _Optional[int] = ..., clusters: _Optional[int] = ...) -> None: ...

class DuplicatesRequest(_message.Message):
    __slots__ = ("min_score", "max_neighbors")
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    min_score: float
    max_neighbors: int
    def __init__(self, min_score: _Optional[float] = ..., max_neighbors: _Optional[int] = ...) -> None: ...

class DuplicateGroup(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, items: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_fingerprint", "arch", "dim", "input_size", "index_type", "index_device", "index_gpus", "item_count", "labelled_count", "label_counts", "max_k", "default_k", "default_tau", "max_batch_size", "max_message_bytes", "server_version", "model_device", "max_suggestions", "predicted_count", "max_queries")
    class LabelCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    INDEX_GPUS_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELLED_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TAU_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERIES_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    arch: str
    dim: int
    input_size: int
    index_type: str
    index_device: str
    index_gpus: int
    item_count: int
    labelled_count: int
    label_counts: _containers.ScalarMap[str, int]
    max_k: int
    default_k: int
    default_tau: float
    max_batch_size: int
    max_message_bytes: int
    server_version: str
    model_device: str
    max_suggestions: int
    predicted_count: int
    max_queries: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., arch: _Optional[str] = ..., dim: _Optional[int] = ..., input_size: _Optional[int] = ..., index_type: _Optional[str] = ..., index_device: _Optional[str] = ..., index_gpus: _Optional[int] = ..., item_count: _Optional[int] = ..., labelled_count: _Optional[int] = ..., label_counts: _Optional[_Mapping[str, int]] = ..., max_k: _Optional[int] = ..., default_k: _Optional[int] = ..., default_tau: _Optional[float] = ..., max_batch_size: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., server_version: _Optional[str] = ..., model_device: _Optional[str] = ..., max_suggestions: _Optional[int] = ..., predicted_count: _Optional[int] = ..., max_queries: _Optional[int] = ...) -> None: ...

class ListLabelsRequest(_message.Message):
    __slots__ = ("human_only",)
    HUMAN_ONLY_FIELD_NUMBER: _ClassVar[int]
    human_only: bool
    def __init__(self, human_only: _Optional[bool] = ...) -> None: ...

class SwitchModelRequest(_message.Message):
    __slots__ = ("model", "store")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    model: str
    store: str
    def __init__(self, model: _Optional[str] = ..., store: _Optional[str] = ...) -> None: ...

class MissingImage(_message.Message):
    __slots__ = ("id", "uri", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    uri: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., uri: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SwitchModelResponse(_message.Message):
    __slots__ = ("previous_fingerprint", "model_fingerprint", "carried", "missing", "item_count")
    PREVIOUS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CARRIED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    previous_fingerprint: str
    model_fingerprint: str
    carried: int
    missing: _containers.RepeatedCompositeFieldContainer[MissingImage]
    item_count: int
    def __init__(self, previous_fingerprint: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., carried: _Optional[int] = ..., missing: _Optional[_Iterable[_Union[MissingImage, _Mapping]]] = ..., item_count: _Optional[int] = ...) -> None: ...
