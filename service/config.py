"""All service configuration, read from SENTIMENT_* environment variables and, for
``python -m service``, from command-line flags of the same names (flags win), validated at
start: a bad value stops the service with a message naming the flag and the variable."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSettingsSource, NoDecode, SettingsConfigDict

from service.bundle import PrecisionChoice, RuntimeChoice, resolve_device

ADMIN_RELOAD = "/admin/reload"
# Lists come from the environment as comma-separated text: SENTIMENT_CORS_ORIGINS=a,b
CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Serve a sentiment model bundle over HTTP. Every flag is also an environment variable,
    SENTIMENT_ and the flag's name in capitals with underscores (--max-batch-size:
    SENTIMENT_MAX_BATCH_SIZE); a flag wins over its variable."""

    model_config = SettingsConfigDict(
        env_prefix="SENTIMENT_", extra="forbid", protected_namespaces=()
    )

    model_dir: Path = Field(Path("models"), description="model repository folder")
    model_name: str = Field("imdb-bigru", description="bundle to serve: <model_dir>/<model_name>/")
    models: CommaList = Field(
        default_factory=list,
        description="more bundles of model_dir served at once beside model_name, by folder name "
        "('*': every bundle there); the Open Inference Protocol (REST and gRPC) serves each "
        "under its card's name, /predict, /explain and the page keep model_name",
    )
    device: str = Field(
        "auto", description="auto (CUDA when available), cpu, cuda or cuda:N; checked at start"
    )
    dtype: PrecisionChoice = Field(
        "auto",
        description="precision the model runs in: auto (int8 on a CPU where the bundle has an "
        "int8 variant, else float32), float32, int8 (the bundle's model.int8.pt; CPU only), or "
        "float16/bfloat16 (meant for CUDA: the weights are cast once at load; a CPU runs them "
        "slower than float32)",
    )
    runtime: RuntimeChoice = Field(
        "auto",
        description="what runs prediction batches: auto (on a CPU, ONNX Runtime for batches "
        "where it is faster when the bundle has model.onnx, TorchScript for the rest and on "
        "CUDA), torchscript, or onnx (every batch on ONNX Runtime; needs model.onnx and a CPU). "
        "Explanations always take their gradients through TorchScript",
    )
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text",
        description="log lines as text or as one JSON object each (TEI's --json-output); "
        "either way each carries its request's x-request-id",
    )
    otlp_endpoint: str | None = Field(
        None,
        pattern=r"^https?://\S+$",
        description="OpenTelemetry collector to send traces to over OTLP/HTTP, e.g. "
        "http://otel-collector:4318 (spans go to its /v1/traces; TEI's --otlp-endpoint); "
        "none: no tracing",
    )
    grpc_port: int = Field(
        8001,
        ge=-1,
        le=65535,
        description="port of the Open Inference Protocol's gRPC service (Triton's and KServe's "
        "inference.GRPCInferenceService; Triton's default port), on the same host; 0: any free "
        "port, -1: no gRPC",
    )

    max_batch_size: int = Field(64, ge=1, le=4096, description="texts per model call")
    max_batch_tokens: int = Field(
        32_768, ge=1, description="padded tokens per model call (texts x longest text)"
    )
    # 0 by default: texts that arrive while a batch runs form the next one, so batching costs
    # a lone request nothing (measured in docs/benchmarks.md).
    max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="how long the first text of a batch waits for company"
    )
    max_queue_texts: int = Field(
        512, ge=1, description="texts admitted and not yet answered; beyond it requests get 429"
    )
    max_inputs_per_request: int = Field(256, ge=1, description="texts in one request at most")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="request body size limit")
    request_timeout_s: float = Field(
        30.0, gt=0, description="deadline per request, queue time included (504 past it)"
    )
    auto_truncate: bool = Field(
        False, description="truncate over-long inputs when a request does not say 'truncate'"
    )
    explain_steps: int = Field(
        32,
        ge=1,
        le=512,
        description="integration steps per explanation (its cost grows with them; the "
        "completeness gap /explain reports shrinks)",
    )
    explain_max_queue: int = Field(
        8, ge=1, description="explanations admitted and not yet answered; beyond it 429"
    )
    explain_timeout_s: float = Field(
        60.0, gt=0, description="deadline per /explain request, queue time included (504)"
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="service processes sharing the port, each with its own model, batcher and "
        "tokenising pool (uvicorn's workers): for a GPU, whose work one process's event loop "
        "cannot keep up with; on a CPU one process batches best",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch computes on (default: torch's, one per core it sees); "
        "in a container, its CPU limit: the inference workers split them",
    )
    tokenization_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="threads that tokenise requests (TEI's --tokenization-workers); more than "
        "one pays off where the model is faster than one thread can tokenise, e.g. on a GPU",
    )
    allocator: Literal["jemalloc", "system"] = Field(
        "jemalloc",
        description="jemalloc: `python -m service` runs itself on jemalloc where "
        "libjemalloc.so.2 is installed (Debian: libjemalloc2), else on the C library's malloc "
        "with a warning; system: the C library's malloc",
    )
    warmup: bool = Field(True, description="run the model on a few batch shapes before serving")
    max_connections: int = Field(
        2048,
        ge=1,
        description="open client connections at most; beyond it a new one gets 503 at once "
        "(uvicorn's limit_concurrency). The service raises its open-file limit to the hard "
        "limit at start and lowers this to fit under it",
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="seconds a client has to send a whole request (line, headers and body) "
        "from its first byte; past it, 408 and the connection closes. A connection that has "
        "sent nothing yet is idle, closed after keep_alive_s as between requests",
    )
    keep_alive_s: int = Field(
        5,
        ge=1,
        description="seconds an idle keep-alive connection stays open (uvicorn's default is 5; "
        "behind a load balancer set it above the balancer's idle timeout)",
    )

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys, comma-separated; none: no authentication",
    )
    api_keys_file: Path | None = Field(
        None,
        description="file of accepted API keys: one per line, UTF-8; blank lines and lines "
        "starting with # are ignored; a key is printable ASCII with no space or #",
    )
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="keys for the admin routes (POST /admin/reload), comma-separated; a client "
        "key is refused there (403)",
    )
    auth_exempt_paths: CommaList = Field(
        default_factory=lambda: [
            "/health",
            "/ready",
            "/metrics",
            "/v2/health/live",
            "/v2/health/ready",
        ],
        description="paths served without an API key",
    )
    admin_reload: bool = Field(
        False,
        description="serve POST /admin/reload (reload the model, as SIGHUP does); needs "
        "admin_api_keys, and the path must not be exempt from keys",
    )
    cors_origins: CommaList = Field(
        default_factory=list, description="origins allowed by CORS; none: CORS off"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        resolve_device(value)  # a ValueError names what is wrong
        return value

    @model_validator(mode="after")
    def _int8_on_cpu(self) -> Settings:
        if self.dtype == "int8" and resolve_device(self.device).type != "cpu":
            raise ValueError(
                f"dtype int8 is CPU only, but device {self.device!r} is CUDA: use float32 or "
                "float16 there (or auto)"
            )
        return self

    @field_validator("api_keys", "auth_exempt_paths", "cors_origins", "models", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _bundle_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if name != "*" and (Path(name).name != name or name in (".", "..")):
                raise ValueError(f"{name!r} is not a bundle folder's name (no paths)")
        return names

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        # Set but empty (an unset ${VAR} in compose) must not mean "no authentication".
        if isinstance(value, str):
            keys = [part.strip() for part in value.split(",") if part.strip()]
            if not keys:
                raise ValueError("set but holds no key; unset it for no authentication")
            for key in keys:
                _check_key(key, "a key")
            return keys
        return value

    @model_validator(mode="after")
    def _read_keys_file(self) -> Settings:
        if self.api_keys_file is not None:
            keys = read_keys_file(self.api_keys_file)
            self.api_keys = [*self.api_keys, *map(SecretStr, keys)]
        if self.admin_reload and self.processes > 1:
            raise ValueError(
                "admin_reload reloads the one process a request reaches; with processes > 1 "
                "send SIGHUP to the parent process, which replaces the processes one by one"
            )
        if self.admin_reload and (
            not self.admin_api_keys or ADMIN_RELOAD in self.auth_exempt_paths
        ):
            raise ValueError(
                "admin_reload serves POST /admin/reload only behind admin keys: set "
                "admin_api_keys and keep the path out of auth_exempt_paths"
            )
        return self

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        # pydantic-settings ignores a prefixed variable that names no setting: a typo, or a
        # scheduler lever set as if it were a setting, would silently not apply.
        known = {f"SENTIMENT_{name.upper()}" for name in type(self).model_fields}
        unknown = sorted(k for k in os.environ if k.startswith("SENTIMENT_") and k not in known)
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: no such setting (README.md lists them; how batches run "
                "is not a setting: the service chooses it for the device)"
            )
        return self

    @property
    def bundle_dir(self) -> Path:
        return self.model_dir / self.model_name

    @property
    def bundle_dirs(self) -> list[Path]:
        """Every bundle to serve, model_name's first (the default model)."""
        if "*" in self.models:
            names = sorted(p.name for p in self.model_dir.iterdir() if (p / "card.json").is_file())
        else:
            names = list(self.models)
        return [self.bundle_dir] + [self.model_dir / n for n in names if n != self.model_name]


def command_line(args: Sequence[str], prog: str = "python -m service") -> CliSettingsSource[Any]:
    """The settings the flags in ``args`` give (pydantic-settings' argparse source): kebab-case
    names, ``--flag`` / ``--no-flag`` for booleans, lists comma-separated or repeated. Reading
    it raises ``SettingsError`` for an unknown or malformed flag; ``--help`` prints every flag
    with its description and default and exits."""
    return CliSettingsSource(
        Settings,
        cli_parse_args=list(args),
        cli_prog_name=prog,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=False,
    )


def as_environment(flags: Mapping[str, object]) -> dict[str, str]:
    """The SENTIMENT_* variables that say what ``flags`` (a ``command_line`` reading) said:
    processes started later (``processes`` > 1) read their settings from the environment."""

    def text(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, list):
            return ",".join(map(str, value))
        return str(value)

    return {f"SENTIMENT_{name.upper()}": text(value) for name, value in flags.items()}


def _check_key(key: str, where: str) -> None:
    if not key.isascii() or not key.isprintable() or any(c in key for c in " #\t"):
        raise ValueError(
            f"{where} holds a space, a '#' or a character that is not printable ASCII (a "
            "comment goes on a line of its own)"
        )


def read_keys_file(path: Path) -> list[str]:
    """The keys of an API keys file, strictly: one key per line; blank lines and lines whose
    first character (after indentation) is # are skipped; anything else that is not a key
    (a space, an inline comment) is an error naming the line. A UTF-8 byte-order mark is
    allowed."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise ValueError(f"api_keys_file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ValueError(f"api_keys_file {path} is not UTF-8 text") from None
    keys = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        _check_key(text, f"api_keys_file {path} line {number}")
        keys.append(text)
    if not keys:
        raise ValueError(f"api_keys_file {path} holds no key")
    return keys
