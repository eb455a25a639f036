"""The closed set of reasons an event can be rejected for.

Each is a label value of ``monitaur_events_rejected_total{reason}``; keeping the set
closed keeps that metric's cardinality fixed and lets dashboards list every reason.
"""

MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_CLIENT = "missing_client"
INVALID_CLIENT = "invalid_client"
INVALID_TIMESTAMP = "invalid_timestamp"
FUTURE_TIMESTAMP = "future_timestamp"  # stamped more than limits.max_future_seconds after the exporter's clock (replay: its start)
INVALID_MODEL = "invalid_model"
MODEL_NOT_ALLOWED = "model_not_allowed"  # a new model name outside model_admission.allowed and .pattern
TOO_MANY_MODELS = "too_many_models"  # a new model name while model_admission.max_models are admitted
MISSING_INPUT = "missing_input"
INVALID_INPUT = "invalid_input"
NON_FINITE = "non_finite"
OUT_OF_RANGE = "out_of_range"
WRONG_DIMENSION = "wrong_dimension"
TOO_MANY_VALUES = "too_many_values"  # an unconfigured model's input or output longer than limits.max_input_values / max_classes
INVALID_OUTPUT = "invalid_output"
NOT_PROBABILITIES = "not_probabilities"
IMAGE_DECODE_ERROR = "image_decode_error"
LINE_TOO_LONG = "line_too_long"
BODY_TOO_LARGE = "body_too_large"
INTERNAL_ERROR = "internal_error"  # the last resort: decoding raised something unforeseen

ALL: tuple[str, ...] = (
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    MISSING_CLIENT,
    INVALID_CLIENT,
    INVALID_TIMESTAMP,
    FUTURE_TIMESTAMP,
    INVALID_MODEL,
    MODEL_NOT_ALLOWED,
    TOO_MANY_MODELS,
    MISSING_INPUT,
    INVALID_INPUT,
    NON_FINITE,
    OUT_OF_RANGE,
    WRONG_DIMENSION,
    TOO_MANY_VALUES,
    INVALID_OUTPUT,
    NOT_PROBABILITIES,
    IMAGE_DECODE_ERROR,
    LINE_TOO_LONG,
    BODY_TOO_LARGE,
    INTERNAL_ERROR,
)
