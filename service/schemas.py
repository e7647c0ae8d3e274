"""Request and response bodies, named by role. The wire format is Hugging Face's
text-classification format, so existing clients (``InferenceClient``, TEI clients) work."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from service.bundle import ModelSummary, TruncationDirection
from service.segments import MIXED_CONFIDENCE

# A text must hold something besides white space. The schema states it as the pattern \S,
# which clients read with ECMAScript's meaning of white space; the validator below uses that
# same set (Python's str.isspace() differs: it counts \x1c-\x1f, and not \ufeff).
_ECMASCRIPT_SPACE = re.compile(
    "[\t\n\v\f\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]*"
)
Text = Annotated[str, WithJsonSchema({"type": "string", "pattern": "\\S"})]


def _json_integer(value: Any) -> Any:
    # JSON's 2 and 2.0 are both integers; "2" and true are not.
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    return value


# The bounds come before the validator, so that the JSON schema states them (minimum, maximum).
TopK = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]
Steps = Annotated[int, Field(ge=1, le=512), BeforeValidator(_json_integer)]


class PredictParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: TopK | None = Field(None, description="return the k best labels (default: all labels)")
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = Field(
        None,
        description="'sigmoid' or 'softmax' (the same for this one-logit model): calibrated "
        "probabilities; 'none': calibrated log-odds",
    )


class ExplainParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: Steps | None = Field(
        None,
        description="integration steps (default: the server's explain_steps); more steps cost "
        "more and shrink the completeness gap",
    )


class _Texts(BaseModel):
    """``inputs``: a text or a list of texts, each holding more than white space."""

    inputs: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="one text, or a list of texts"
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("inputs must be a string or a list of strings")
        if not texts:
            raise ValueError("inputs is an empty list")
        for i, text in enumerate(texts):
            where = "inputs" if isinstance(value, str) else f"inputs[{i}]"
            if _ECMASCRIPT_SPACE.fullmatch(text):
                raise ValueError(f"{where} is empty or only white space")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"{where} is not valid Unicode (lone surrogate at {exc.start})"
                ) from None
        return value

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


class _TextsRequest(_Texts):
    """``inputs`` and ``truncate``, shared by /predict and /explain."""

    truncate: StrictBool | None = Field(
        None,
        description="read a longer text cut to max_length tokens (its first and last tokens, "
        "as /info's truncation says) instead of refusing it (default: the server's "
        "auto_truncate setting)",
    )


class PredictRequest(_TextsRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"inputs": "A wonderful, moving film."}],
            # What _one_score_function refuses, stated for clients (and the fuzzer).
            "not": {
                "required": ["raw_scores", "parameters"],
                "properties": {
                    "raw_scores": {"const": True},
                    "parameters": {
                        "required": ["function_to_apply"],
                        "properties": {"function_to_apply": {"enum": ["sigmoid", "softmax"]}},
                    },
                },
            },
        },
    )

    parameters: PredictParameters = Field(default_factory=PredictParameters)
    # TEI's two fields, with TEI's meaning.
    raw_scores: StrictBool = Field(
        False,
        description="TEI's: the calibrated log-odds instead of probabilities (as "
        "parameters.function_to_apply 'none')",
    )
    truncation_direction: TruncationDirection | None = Field(
        None,
        description="TEI's: with truncate, cut a longer text on the 'Right' (keep its first "
        "max_length tokens) or on the 'Left' (keep its last) instead of the card's head and "
        "tail",
    )

    @model_validator(mode="after")
    def _one_score_function(self) -> PredictRequest:
        if self.raw_scores and self.parameters.function_to_apply not in (None, "none"):
            raise ValueError(
                "raw_scores asks for log-odds, parameters.function_to_apply for "
                f"{self.parameters.function_to_apply!r}: send one of them"
            )
        return self

    @property
    def function(self) -> Literal["sigmoid", "softmax", "none"] | None:
        return "none" if self.raw_scores else self.parameters.function_to_apply


class TokenizeRequest(_Texts):
    """TEI's /tokenize."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": "A wonderful, moving film."}]},
    )

    add_special_tokens: StrictBool = Field(
        True, description="TEI's; this model's tokenizer adds no special tokens either way"
    )


class SimpleToken(BaseModel):
    """A token as TEI's /tokenize gives it: offsets in code points, as /explain's."""

    id: int
    text: str = Field(description="the token as written: input[start:stop]")
    special: bool
    start: int
    stop: int


class ExplainRequest(_TextsRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"inputs": "The acting was wonderful but the plot was dull."}]
        },
    )

    parameters: ExplainParameters = Field(default_factory=ExplainParameters)


class LabelScore(BaseModel):
    label: str
    score: float


# Always one list of labels per text, for a single text too: Hugging Face's text-classification
# answer, which its InferenceClient reads as [[{label, score}, ...]] and unwraps once.
PredictResponse = list[list[LabelScore]]


class TokenAttribution(BaseModel):
    token: str = Field(description="the vocabulary entry the model read (<unk>: unknown word)")
    text: str = Field(description="the token as written: input[start:end]")
    start: int = Field(description="offset of its first character in the input (code points)")
    end: int = Field(description="offset after its last character")
    attribution: float = Field(
        description="its contribution to the POSITIVE logit (integrated gradients)"
    )


class TokenRange(BaseModel):
    start: int = Field(description="the first token dropped, as an index in the text's tokens")
    end: int = Field(description="the index after the last token dropped")
    text_start: int = Field(
        description="the characters not read start here: where the last token read from the "
        "start ends"
    )
    text_end: int = Field(
        description="and end here: where the first token read from the end starts"
    )


class SegmentScore(BaseModel):
    start: int
    end: int
    label: str
    score: float = Field(description="calibrated probability of label, scored on its own")


class Completeness(BaseModel):
    attribution_sum: float
    logit: float = Field(
        description="the text's POSITIVE logit (before calibration) by the model explained: the "
        "served one, or model.pt's float32 weights where the service runs int8 (a quantised GRU "
        "has no gradient), whose logit can differ a little from /predict's"
    )
    baseline_logit: float = Field(description="the logit of as many padding embeddings")
    gap: float = Field(description="attribution_sum - (logit - baseline_logit): quadrature error")


class Explanation(BaseModel):
    label: str = Field(description="the predicted label, as /predict gives it")
    score: float = Field(description="its calibrated probability, as /predict gives it")
    tokens: list[TokenAttribution] = Field(
        description="the tokens the model read: all of them, or the first and last a "
        "truncated text keeps"
    )
    dropped_tokens: TokenRange | None = Field(
        description="the tokens truncation dropped, as one range (not listed in tokens); null "
        "if none"
    )
    sentences: list[SegmentScore] = Field(
        description="each sentence or clause of the text the model read (one that truncation "
        "cuts: its part read), scored alone"
    )
    mixed: bool = Field(
        description="one sentence or clause is POSITIVE and another NEGATIVE, each with a "
        f"probability of at least {MIXED_CONFIDENCE}"
    )
    completeness: Completeness
    steps: int


ExplainResponse = list[Explanation]


class ReloadResponse(BaseModel):
    name: str
    version: str = Field(description="the version now serving (the card's)")
    previous_version: str
    seconds: float = Field(description="time to load, check and warm the new model")


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong, in words")
    error_type: str = Field(description="machine-readable kind, e.g. validation, overloaded")


class HealthResponse(BaseModel):
    status: Literal["ok", "ready"]


class BatchSettings(BaseModel):
    max_batch_size: int
    max_batch_tokens: int
    max_wait_ms: float
    max_queue_texts: int
    max_inputs_per_request: int
    request_timeout_s: float
    auto_truncate: bool
    processes: int = Field(description="service processes sharing the port, each its own batcher")


class SchedulerPolicy(BaseModel):
    """How batches run, as the scheduler resolved it for the device (service.scheduler)."""

    runtime: str = Field(
        description="what runs prediction batches: torchscript, onnxruntime, or "
        "onnxruntime+torchscript (batches of at most onnx_max_texts texts on ONNX Runtime, "
        "larger ones on TorchScript); SENTIMENT_RUNTIME"
    )
    onnx_max_texts: int = Field(
        description="the largest batch ONNX Runtime runs (0: none; it needs model.onnx)"
    )

    inference_workers: int = Field(description="batches the model runs side by side")
    threads_per_batch: int | None = Field(
        description="torch intra-op threads each batch runs on (null on CUDA: torch's own)"
    )
    batch_step_texts: float = Field(
        description="the batcher's cost model: a step's fixed cost in texts (0: no cost model)"
    )
    fork_directions: bool = Field(
        description="a lone batch on a CPU computes the GRU's two directions on two threads"
    )
    explain_share: float = Field(
        description="most of the workers' time explanations take while predictions wait"
    )


class ExplainSettings(BaseModel):
    explain_steps: int
    explain_max_queue: int
    explain_timeout_s: float


class CudaMemory(BaseModel):
    allocated: int
    reserved: int
    peak: int


class InfoResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: ModelSummary = Field(description="the served bundle's card, without its training run")
    device: str
    dtype: str = Field(description="the precision the model runs in (SENTIMENT_DTYPE)")
    cuda_memory: CudaMemory | None = Field(
        description="bytes on the CUDA device (null on a CPU), as in sentiment_cuda_memory_bytes"
    )
    batching: BatchSettings
    scheduler: SchedulerPolicy
    explanations: ExplainSettings
