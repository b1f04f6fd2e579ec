from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Array(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedArray(_message.Message):
    __slots__ = ("name", "array")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    name: str
    array: Array
    def __init__(self, name: _Optional[str] = ..., array: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("array", "none", "items")
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    array: Array
    none: bool
    items: ValueList
    def __init__(self, array: _Optional[_Union[Array, _Mapping]] = ..., none: _Optional[bool] = ..., items: _Optional[_Union[ValueList, _Mapping]] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class GraphDelta(_message.Message):
    __slots__ = ("spec_json", "arrays", "seq")
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    arrays: _containers.RepeatedCompositeFieldContainer[NamedArray]
    seq: int
    def __init__(self, spec_json: _Optional[str] = ..., arrays: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ..., seq: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("kind", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("optimize", "max_cached_plans", "deltas")
    OPTIMIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHED_PLANS_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    optimize: bool
    max_cached_plans: int
    deltas: _containers.RepeatedCompositeFieldContainer[GraphDelta]
    def __init__(self, optimize: _Optional[bool] = ..., max_cached_plans: _Optional[int] = ..., deltas: _Optional[_Iterable[_Union[GraphDelta, _Mapping]]] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("session", "heartbeat_s", "error", "applied_seq")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    session: str
    heartbeat_s: float
    error: Error
    applied_seq: int
    def __init__(self, session: _Optional[str] = ..., heartbeat_s: _Optional[float] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., applied_seq: _Optional[int] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("session", "deltas")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    session: str
    deltas: _containers.RepeatedCompositeFieldContainer[GraphDelta]
    def __init__(self, session: _Optional[str] = ..., deltas: _Optional[_Iterable[_Union[GraphDelta, _Mapping]]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("error", "applied_seq")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    error: Error
    applied_seq: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., applied_seq: _Optional[int] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("session", "deltas", "feed_ids", "feeds", "fetch_ids", "trace", "plan", "trace_level")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    FEED_IDS_FIELD_NUMBER: _ClassVar[int]
    FEEDS_FIELD_NUMBER: _ClassVar[int]
    FETCH_IDS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TRACE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    session: str
    deltas: _containers.RepeatedCompositeFieldContainer[GraphDelta]
    feed_ids: _containers.RepeatedScalarFieldContainer[int]
    feeds: _containers.RepeatedCompositeFieldContainer[Array]
    fetch_ids: _containers.RepeatedScalarFieldContainer[int]
    trace: bool
    plan: bool
    trace_level: int
    def __init__(self, session: _Optional[str] = ..., deltas: _Optional[_Iterable[_Union[GraphDelta, _Mapping]]] = ..., feed_ids: _Optional[_Iterable[int]] = ..., feeds: _Optional[_Iterable[_Union[Array, _Mapping]]] = ..., fetch_ids: _Optional[_Iterable[int]] = ..., trace: _Optional[bool] = ..., plan: _Optional[bool] = ..., trace_level: _Optional[int] = ...) -> None: ...

class RunReply(_message.Message):
    __slots__ = ("outputs", "executed", "peak_bytes", "plan_json", "error", "applied_seq", "run_s", "step_stats_json")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EXECUTED_FIELD_NUMBER: _ClassVar[int]
    PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    RUN_S_FIELD_NUMBER: _ClassVar[int]
    STEP_STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Value]
    executed: _containers.RepeatedScalarFieldContainer[str]
    peak_bytes: int
    plan_json: str
    error: Error
    applied_seq: int
    run_s: float
    step_stats_json: str
    def __init__(self, outputs: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., executed: _Optional[_Iterable[str]] = ..., peak_bytes: _Optional[int] = ..., plan_json: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., applied_seq: _Optional[int] = ..., run_s: _Optional[float] = ..., step_stats_json: _Optional[str] = ...) -> None: ...

class VariablesReply(_message.Message):
    __slots__ = ("variables", "error", "applied_seq")
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    variables: _containers.RepeatedCompositeFieldContainer[NamedArray]
    error: Error
    applied_seq: int
    def __init__(self, variables: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., applied_seq: _Optional[int] = ...) -> None: ...

class LoadVariablesRequest(_message.Message):
    __slots__ = ("session", "deltas", "variables", "strict")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    session: str
    deltas: _containers.RepeatedCompositeFieldContainer[GraphDelta]
    variables: _containers.RepeatedCompositeFieldContainer[NamedArray]
    strict: bool
    def __init__(self, session: _Optional[str] = ..., deltas: _Optional[_Iterable[_Union[GraphDelta, _Mapping]]] = ..., variables: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ..., strict: _Optional[bool] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("inputs",)
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Array]
    def __init__(self, inputs: _Optional[_Iterable[_Union[Array, _Mapping]]] = ...) -> None: ...

class PredictReply(_message.Message):
    __slots__ = ("outputs", "single_output", "error")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SINGLE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Array]
    single_output: bool
    error: Error
    def __init__(self, outputs: _Optional[_Iterable[_Union[Array, _Mapping]]] = ..., single_output: _Optional[bool] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("info_json", "error")
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    info_json: str
    error: Error
    def __init__(self, info_json: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
