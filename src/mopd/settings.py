"""Settings from environment variables.

Every field reads ``MOPD_<FIELD NAME>``. The teacher list and the route key also
read the names that manifests of the original distillation recipe already set.
Precedence, first match wins:

    teachers:   MOPD_TEACHERS (JSON list of objects)
                > DISTILLATION_TEACHERS (comma-separated models)
                > OPD_TEACHERS (comma-separated models)
                > DISTILLATION_TEACHER_MODEL (one teacher)
    route key:  MOPD_ROUTE_KEY > DISTILLATION_TEACHER_ROUTE_KEY
                > OPD_TEACHER_ROUTE_KEY > "teacher"

A lower-precedence variable that is set but shadowed is reported in the
start-up log, never silently merged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mopd.errors import ConfigError

ENV_PREFIX = "MOPD_"

# Teacher list variables, highest precedence first.
TEACHER_LIST_VARS = ("DISTILLATION_TEACHERS", "OPD_TEACHERS")
SINGLE_TEACHER_VAR = "DISTILLATION_TEACHER_MODEL"
ROUTE_KEY_VARS = ("MOPD_ROUTE_KEY", "DISTILLATION_TEACHER_ROUTE_KEY", "OPD_TEACHER_ROUTE_KEY")
DEFAULT_ROUTE_KEY = "teacher"


class TeacherConfig(BaseModel):
    """One frozen teacher and the route it serves."""

    model_config = {"extra": "forbid", "frozen": True}

    model: str = Field(description="Model name or local directory of the teacher.")
    route: str = Field(
        "",
        description="Route value that selects this teacher; empty means the model name.",
    )
    messages_key: str = Field(
        "teacher_messages",
        description="Row key holding this teacher's privileged prompt; the student messages are used when the row lacks it.",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer the teacher declares; checked against the student's at start-up. None means the student's.",
    )
    workers: int | None = Field(
        None, ge=1, description="Concurrent scoring workers; None means MOPD_TEACHER_WORKERS."
    )
    weight: float = Field(
        1.0, gt=0.0, description="Weight of this teacher when MOPD_LOSS_FN=topk_forward_kl blends teachers."
    )
    base_urls: list[str] | None = Field(
        None,
        description="Base URLs of the teacher's server replicas (openai backend), e.g. [\"http://127.0.0.1:8001\"]. "
        "None means the route's entry in MOPD_TEACHER_BASE_URLS.",
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable that contains this teacher's API key (openai backend). "
        "None means MOPD_TEACHER_API_KEY.",
    )

    @model_validator(mode="after")
    def _default_route(self) -> TeacherConfig:
        if not self.model.strip():
            raise ValueError("a teacher has an empty model name; give every teacher a model")
        if not self.route:
            object.__setattr__(self, "route", self.model)
        return self


class Settings(BaseSettings):
    """All service settings. Units are in the field names or descriptions."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    # --- input ---------------------------------------------------------------
    data_path: str | None = Field(
        None, description="JSONL file or glob pattern of input rows. None with no teachers runs the embedded demo."
    )
    epochs: int = Field(1, ge=0, description="Passes over the input; 0 repeats until max_steps or a stop signal.")
    max_line_bytes: int = Field(
        1 << 20, ge=64, description="Maximum input line length in bytes; longer lines are rejected as line_too_long."
    )
    follow: bool = Field(
        False,
        description="Follow mode: tail MOPD_DATA_PATH (a file, a directory of *.jsonl files or a glob) for "
        "appended lines and new files until a stop signal; MOPD_EPOCHS is ignored.",
    )
    follow_poll_seconds: float = Field(
        0.5, gt=0.0, description="Seconds between two looks for new lines and files in follow mode."
    )

    # --- teachers and routing -------------------------------------------------
    teachers_json: list[TeacherConfig] | None = Field(
        None,
        validation_alias=AliasChoices("MOPD_TEACHERS"),
        description='JSON list of teachers, e.g. [{"model": "m", "route": "r", "workers": 4}]. Highest precedence.',
    )
    distillation_teachers: str | None = Field(
        None, validation_alias=AliasChoices("DISTILLATION_TEACHERS"),
        description="Comma-separated teacher models; each is routed by its own name.",
    )
    opd_teachers: str | None = Field(
        None, validation_alias=AliasChoices("OPD_TEACHERS"),
        description="Legacy fallback of DISTILLATION_TEACHERS.",
    )
    distillation_teacher_model: str | None = Field(
        None, validation_alias=AliasChoices("DISTILLATION_TEACHER_MODEL"),
        description="One teacher for every row (single-teacher mode; rows need no route key).",
    )
    route_key: str | None = Field(
        None,
        validation_alias=AliasChoices(*ROUTE_KEY_VARS),
        description="Row key that names the teacher. None means 'teacher'.",
    )
    teacher_workers: int = Field(2, ge=1, description="Default concurrent scoring workers per teacher.")
    teacher_queue_size: int = Field(
        8, ge=1, description="Capacity of each route's queue in groups; a full queue makes the dispatcher wait."
    )

    # --- backend --------------------------------------------------------------
    backend: Literal["local", "openai", "tinker"] = Field(
        "local",
        description="Student, teacher and trainer backend: local (in-process models), openai (student and "
        "teachers on OpenAI-compatible servers, local trainer) or tinker (student, teachers and trainer on the "
        "Tinker training API).",
    )
    student_model: str | None = Field(
        None, description="Student model name or local directory. None is only valid in the embedded demo."
    )
    model_root: str | None = Field(
        None, description="Directory where model names that are not paths are looked up (local backend)."
    )
    device: str = Field("auto", description="Torch device for the local backend: auto, cpu, cuda or cuda:N.")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0 leaves torch's default.")

    # --- sampling -------------------------------------------------------------
    completions_per_prompt: int = Field(4, ge=1, description="Samples per row (group size).")
    max_tokens: int = Field(32, ge=1, description="Maximum completion tokens per sample.")
    temperature: float = Field(1.0, gt=0.0, description="Student sampling temperature (> 0).")
    truncated_policy: Literal["train", "skip"] = Field(
        "train",
        description="What to do with completions cut at max_tokens: train them (flagged and counted) or skip them.",
    )
    student_concurrency: int = Field(
        8, ge=1, description="Fixed window of concurrent student requests."
    )
    max_batch_size: int = Field(
        64, ge=1, description="Maximum sequences the local backend runs in one batch."
    )

    # --- concurrency ----------------------------------------------------------
    concurrency_mode: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="Student concurrency control: 'fixed' keeps MOPD_STUDENT_CONCURRENCY requests in flight; "
        "'adaptive' sizes the window from latency and server queue signals.",
    )
    concurrency_min_window: int = Field(1, ge=1, description="Smallest adaptive window (requests).")
    concurrency_max_window: int = Field(256, ge=1, description="Largest adaptive window (requests).")
    concurrency_initial_window: int | None = Field(
        None, ge=1, description="Adaptive window at start (requests); None means MOPD_STUDENT_CONCURRENCY."
    )
    concurrency_grow_below_ratio: float = Field(
        1.2, ge=1.0, description="The adaptive window grows while median latency stays under this multiple of "
        "the uncongested baseline.",
    )
    concurrency_shrink_above_ratio: float = Field(
        1.4, gt=1.0, description="The adaptive window shrinks when median latency passes this multiple of the "
        "baseline.",
    )
    concurrency_queue_tolerance_seconds: float = Field(
        0.0, ge=0.0, description="Server-reported queue time (seconds) tolerated, on top of 10% of the "
        "baseline, before the adaptive window shrinks.",
    )
    concurrency_baseline_window_seconds: float = Field(
        600.0, gt=0.0, description="Seconds over which the uncongested latency baseline is a running minimum.",
    )
    route_stall_seconds: float | None = Field(
        300.0, gt=0.0, description="A teacher call longer than this (seconds) marks its route stalled: its rows "
        "are shed to the rejects file as route_stalled until a probe succeeds. None never marks a route.",
    )

    # --- unavailable teachers ---------------------------------------------------
    dead_letter_seconds: float = Field(
        300.0, ge=0.0,
        description="Seconds a row waits for its route's teacher to come back (refused connections, timeouts or "
        "5xx after the HTTP retries) before it goes to the dead-letter file; 0 sends it there at the first such "
        "failure that finds no retry budget.",
    )
    dead_letter_path: Path | None = Field(
        None, description="Dead-letter JSONL; None means <state_dir>/dead_letters.jsonl."
    )
    teacher_breaker_failures: int = Field(
        3, ge=1, description="Unavailable failures in a row that open a route's circuit breaker."
    )
    teacher_breaker_cooldown_seconds: float = Field(
        5.0, gt=0.0, description="Seconds an open breaker waits before one probe row goes to the teacher; doubled "
        "after each failed probe, up to 16 times.",
    )
    teacher_retry_budget_ratio: float = Field(
        0.2, ge=0.0, description="In-place retries of a failed group that each successful teacher call earns, per "
        "route (the budget holds at most 10); without budget the row waits and is sampled again.",
    )
    teacher_max_parked_rows: int = Field(
        10_000, ge=1, description="Rows per route that may wait for an unavailable teacher; more go to the "
        "dead-letter file at once.",
    )

    @model_validator(mode="after")
    def _concurrency_bounds(self) -> Settings:
        initial = self.concurrency_initial_window or self.student_concurrency
        if self.concurrency_mode == "adaptive" and not (
            self.concurrency_min_window <= initial <= self.concurrency_max_window
        ):
            raise ValueError(
                f"the adaptive window needs MOPD_CONCURRENCY_MIN_WINDOW ({self.concurrency_min_window}) <= initial "
                f"window ({initial}) <= MOPD_CONCURRENCY_MAX_WINDOW ({self.concurrency_max_window}); the initial "
                "window is MOPD_CONCURRENCY_INITIAL_WINDOW or else MOPD_STUDENT_CONCURRENCY"
            )
        if self.concurrency_grow_below_ratio >= self.concurrency_shrink_above_ratio:
            raise ValueError(
                f"MOPD_CONCURRENCY_GROW_BELOW_RATIO ({self.concurrency_grow_below_ratio}) must be below "
                f"MOPD_CONCURRENCY_SHRINK_ABOVE_RATIO ({self.concurrency_shrink_above_ratio})"
            )
        return self

    # --- training -------------------------------------------------------------
    prompt_groups_per_step: int = Field(16, ge=1, description="Groups (rows) per optimizer step.")
    learning_rate: float = Field(3e-4, gt=0.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    loss_scale: float = Field(1.0, gt=0.0, description="Factor on every advantage.")
    discount: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Discount factor: each token's advantage also gets the discounted negative reverse KL of the "
        "tokens after it (sum over j > t of discount^(j - t) times their advantage); 0 adds nothing.",
    )
    lora_rank: int = Field(
        0, ge=0, description="LoRA rank of the local trainer (local and openai backends); 0 trains every weight."
    )
    lora_alpha: float | None = Field(
        None, gt=0.0, description="LoRA alpha: updates are scaled by alpha / rank. None means 2 x MOPD_LORA_RANK."
    )
    lora_target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["all-linear"],
        description="Comma-separated module names that get LoRA matrices, e.g. q_proj,v_proj; all-linear means "
        "every linear layer but the output head.",
    )
    lora_publish: Literal["merged", "adapter"] = Field(
        "merged",
        description="What the LoRA trainer publishes after each step: merged (full weights, base plus update) or "
        "adapter (a peft adapter directory, the form vLLM's /v1/load_lora_adapter loads).",
    )
    loss_fn: Literal["importance_sampling", "topk_forward_kl"] = Field(
        "importance_sampling",
        description="Trainer loss: importance_sampling (sampled reverse KL, one routed teacher per row) or "
        "topk_forward_kl (cross-entropy on the teachers' top-K distributions at every completion position).",
    )
    topk: int = Field(
        20, ge=1, description="K of topk_forward_kl: candidates each teacher returns per position, and kept after "
        "blending.",
    )
    topk_blend: Literal["all", "route"] = Field(
        "all",
        description="Teachers behind each topk_forward_kl target: all (every teacher, blended by its weight) or "
        "route (only the row's own teacher).",
    )
    topk_route_weight: float = Field(
        1.0, gt=0.0,
        description="With MOPD_TOPK_BLEND=all, factor on the weight of the row's own teacher in its targets; 1 "
        "blends by the teachers' weights alone.",
    )
    openai_max_logprobs: int = Field(
        20, ge=1, description="Most top-K candidates the teacher servers return per position (vLLM --max-logprobs, "
        "default 20); a larger MOPD_TOPK stops start-up (openai backend).",
    )
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps; 0 runs until the input ends.")
    max_policy_lag: int = Field(
        0, ge=0, description="Policy versions a sample may lag behind the trainer; 0 is strict on-policy."
    )
    seed: int = Field(0, description="Seed for sampling and training.")

    # --- evaluation -------------------------------------------------------------
    eval_path: str | None = Field(
        None, description="Held-out JSONL with expected_answer; evaluated before and after training. None skips."
    )
    eval_max_tokens: int = Field(16, ge=1, description="Maximum tokens of a greedy evaluation completion.")
    eval_every_steps: int = Field(
        0, ge=0, description="Evaluate on MOPD_EVAL_PATH every this many optimizer steps (accuracy and teacher-trace "
        "logprob gap per route, written to the step metrics JSONL); 0 evaluates only before and after training.",
    )

    # --- service --------------------------------------------------------------
    state_dir: Path = Field(
        Path("runs/mopd"),
        description="Directory for the trainer checkpoint, the resume cursor, rejects, dead letters, step metrics "
        "and the summary. A restart with the same directory resumes the run; use a new one for a new run.",
    )
    rejects_path: Path | None = Field(None, description="Rejects JSONL; None means <state_dir>/rejects.jsonl.")
    queue_size: int = Field(32, ge=1, description="Capacity of each queue between stages (items).")
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus endpoint.")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Port of the Prometheus endpoint; 0 picks a free one.")
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="Log renderer; auto is JSON unless stderr is a terminal."
    )
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0.0, description="Seconds to drain in-flight work after a stop signal before abandoning it."
    )
    checkpoint_every_steps: int = Field(
        1, ge=1, description="Optimizer steps between two commits of the trainer checkpoint and the resume cursor; "
        "after a crash, rows trained since the last commit are trained again.",
    )
    checkpoint_keep: int = Field(2, ge=1, description="Trainer checkpoint files kept in <state_dir>/checkpoints.")

    # --- openai backend -------------------------------------------------------
    student_base_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated base URLs of the student server replicas, e.g. http://127.0.0.1:8000. "
        "Required with MOPD_BACKEND=openai; empty with the local backend.",
    )
    student_model_dir: str | None = Field(
        None,
        description="Local save_pretrained directory of the student (tokenizer and the trainer's starting weights) "
        "when MOPD_STUDENT_MODEL is the served model name. None means MOPD_STUDENT_MODEL is that directory.",
    )
    teacher_base_urls: dict[str, list[str]] = Field(
        default_factory=dict,
        description='JSON object route -> list of base URLs, e.g. {"math-teacher": ["http://127.0.0.1:8001"]}, '
        "for teachers named by DISTILLATION_TEACHERS. A teacher's own base_urls win.",
    )
    student_api_key: SecretStr | None = Field(
        None, description="Bearer token for the student servers. None sends no Authorization header."
    )
    teacher_api_key: SecretStr | None = Field(
        None, description="Bearer token for teacher servers whose api_key_env is unset. None sends none."
    )
    openai_dialect: Literal["vllm", "sglang", "fireworks"] = Field(
        "vllm", description="Request and response shapes of the servers: vllm, sglang or fireworks."
    )
    openai_score_mode: Literal["auto", "prompt_logprobs", "echo", "generate"] = Field(
        "auto",
        description="How teachers score: prompt_logprobs (vLLM), echo (vLLM, SGLang OpenAI route, Fireworks) or "
        "generate (SGLang native /generate). auto picks prompt_logprobs, generate and echo per dialect.",
    )
    openai_token_ids: Literal["return_token_ids", "tokens_as_token_ids"] = Field(
        "return_token_ids",
        description="How vLLM returns sampled ids: return_token_ids (vLLM >= 0.10.2) or tokens_as_token_ids "
        "(tokens like token_id:123, older versions).",
    )
    openai_processed_logprobs: bool = Field(
        False,
        description="Declares that the student server reports logprobs after temperature (vLLM "
        "--logprobs-mode processed_logprobs; the mopd model server always does). Required when "
        "MOPD_TEMPERATURE is not 1.",
    )
    openai_connect_timeout_seconds: float = Field(5.0, gt=0.0, description="Seconds to open a connection.")
    openai_read_timeout_seconds: float = Field(
        120.0, gt=0.0, description="Seconds to wait for a response (and to send a request) before a retry."
    )
    openai_pool_timeout_seconds: float = Field(
        30.0, gt=0.0, description="Seconds to wait for a free connection of the pool."
    )
    openai_max_retries: int = Field(
        4, ge=0, description="Retries of a failed request (connect error, timeout, 408, 429, 5xx); 0 never retries."
    )
    openai_retry_base_seconds: float = Field(
        0.5, ge=0.0, description="Backoff before the first retry in seconds, doubled per retry, with jitter."
    )
    openai_retry_max_seconds: float = Field(
        30.0, ge=0.0, description="Maximum wait between retries in seconds, Retry-After included."
    )
    openai_weight_sync: Literal["auto", "lora", "disk"] = Field(
        "auto",
        description="How new weights reach the student server: lora (POST /v1/load_lora_adapter under a new "
        "name per version; vLLM, with MOPD_LORA_RANK and MOPD_LORA_PUBLISH=adapter), disk (POST "
        "/update_weights_from_disk with full weights; SGLang), or auto (lora when the trainer publishes a LoRA "
        "adapter, else disk).",
    )
    openai_weight_dir: Path | None = Field(
        None, description="Directory the trainer writes weight versions to. None means <state_dir>/weights."
    )
    openai_weight_server_dir: str | None = Field(
        None,
        description="The weight directory as the student server sees it (a container mount). None means the "
        "server reads MOPD_OPENAI_WEIGHT_DIR itself.",
    )
    openai_keep_weight_versions: int = Field(
        2, ge=1, description="Weight versions kept on disk and loaded on the server; older ones are removed."
    )

    @property
    def effective_weight_sync(self) -> Literal["lora", "disk"]:
        """The weight sync mode after resolving ``auto``."""
        if self.openai_weight_sync != "auto":
            return self.openai_weight_sync
        return "lora" if self.lora_rank and self.lora_publish == "adapter" else "disk"

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            names = [name.strip() for name in value.split(",") if name.strip()]
            if not names:
                raise ValueError("no module named; list modules such as q_proj,v_proj or use all-linear")
            return names
        return value

    @field_validator("student_base_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [url.strip() for url in value.split(",") if url.strip()]
        return value

    # --- tinker backend ---------------------------------------------------------
    tinker_base_url: str | None = Field(
        None,
        validation_alias=AliasChoices("MOPD_TINKER_BASE_URL", "TINKER_BASE_URL"),
        description="Base URL of the Tinker service (tinker backend). None means the tinker SDK's default.",
    )
    tinker_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("TINKER_API_KEY", "MOPD_TINKER_API_KEY"),
        description="API key of the Tinker service (tinker backend); sent by the SDK, never logged. Required "
        "with MOPD_BACKEND=tinker.",
    )
    tinker_lora_rank: int = Field(
        32, ge=1, description="LoRA rank of the student that the Tinker service trains (tinker backend)."
    )

    # --- embedded demo ----------------------------------------------------------
    demo: bool | None = Field(
        None, description="Run the embedded demo; None runs it when no teacher and no data path are set."
    )
    demo_dir: Path | None = Field(None, description="Cache directory of the demo models and data.")

    @field_validator("route_key")
    @classmethod
    def _route_key_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the route key is empty; unset it to use 'teacher' or name the row key")
        return value

    # --- derived ----------------------------------------------------------------

    @property
    def effective_route_key(self) -> str:
        return self.route_key or DEFAULT_ROUTE_KEY

    @property
    def effective_rejects_path(self) -> Path:
        return self.rejects_path or self.state_dir / "rejects.jsonl"

    @property
    def effective_dead_letter_path(self) -> Path:
        return self.dead_letter_path or self.state_dir / "dead_letters.jsonl"

    @property
    def is_demo(self) -> bool:
        if self.demo is not None:
            return self.demo
        return self.data_path is None and not resolve_teachers(self)[0]

    def teacher_workers_for(self, teacher: TeacherConfig) -> int:
        return teacher.workers or self.teacher_workers


def _split_models(variable: str, value: str) -> list[TeacherConfig]:
    entries = value.split(",")
    teachers = []
    for position, entry in enumerate(entries, start=1):
        name = entry.strip()
        if not name:
            raise ConfigError(
                f"{variable}={value!r} has an empty entry at position {position}; "
                "remove the extra comma so every entry names a teacher model"
            )
        teachers.append(TeacherConfig(model=name))
    return teachers


def resolve_teachers(settings: Settings) -> tuple[list[TeacherConfig], str | None, list[str]]:
    """Pick the teacher list by precedence.

    :returns: the teachers, the variable they came from (None when no variable
        is set) and the names of set variables that were shadowed.
    """
    candidates: list[tuple[str, list[TeacherConfig] | str | None]] = [
        ("MOPD_TEACHERS", settings.teachers_json),
        ("DISTILLATION_TEACHERS", settings.distillation_teachers),
        ("OPD_TEACHERS", settings.opd_teachers),
        (SINGLE_TEACHER_VAR, settings.distillation_teacher_model),
    ]
    present = [(name, value) for name, value in candidates if value is not None]
    if not present:
        return [], None, []

    source, value = present[0]
    shadowed = [name for name, _ in present[1:]]
    if isinstance(value, list):
        teachers = list(value)
    elif source == SINGLE_TEACHER_VAR:
        if not value.strip():
            raise ConfigError(f"{SINGLE_TEACHER_VAR} is set but empty; set it to the teacher model or unset it")
        teachers = [TeacherConfig(model=value.strip())]
    else:
        teachers = _split_models(source, value)

    if not teachers:
        raise ConfigError(f"{source} lists no teacher; name at least one teacher model or unset it")

    seen: set[str] = set()
    for teacher in teachers:
        if teacher.route in seen:
            raise ConfigError(
                f"{source} gives two teachers the route {teacher.route!r}; every route must select exactly one "
                'teacher, so remove the duplicate or set a distinct "route" per teacher in MOPD_TEACHERS'
            )
        seen.add(teacher.route)
    return teachers, source, shadowed


def _field_of(name: str) -> str:
    """Map an error location (a field name or one of its aliases) to the field name."""
    for field, info in Settings.model_fields.items():
        if isinstance(info.validation_alias, AliasChoices) and name in info.validation_alias.choices:
            return field
    return name


def _env_name(field: str, env: Mapping[str, str]) -> str:
    """Name the variable behind ``field``: the alias that is set, else the first alias or the prefixed name."""
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        names = [str(choice) for choice in info.validation_alias.choices]
        return next((name for name in names if name in env), names[0])
    if info is None:
        return field
    return ENV_PREFIX + field.upper()


def _settings_from(env: Mapping[str, str]) -> Settings:
    # pydantic-settings reads os.environ, so an explicit mapping is swapped in
    # for the duration of the call. Only start-up code and tests pass one.
    saved = os.environ.copy()
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``environ`` (default: the process environment).

    :raises ConfigError: with one line per invalid variable, naming it and its value.
    """
    env = dict(os.environ if environ is None else environ)
    try:
        if environ is None:
            settings = Settings()
        else:
            settings = _settings_from(env)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = [str(part) for part in error["loc"]] or ["settings"]
            name = _env_name(_field_of(loc[0]), env)
            raw = env.get(name)
            shown = f"={raw!r}" if raw is not None else ""
            where = f" (at {'.'.join(loc[1:])})" if len(loc) > 1 else ""
            lines.append(f"{name}{shown}{where}: {error['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from exc

    teachers, source, _ = resolve_teachers(settings)
    if not settings.is_demo:
        if not teachers:
            raise ConfigError(
                "no teacher is configured: set DISTILLATION_TEACHERS to a comma-separated list of teacher "
                "models (or DISTILLATION_TEACHER_MODEL for one teacher, or MOPD_TEACHERS as JSON)"
            )
        if settings.data_path is None:
            raise ConfigError("MOPD_DATA_PATH is not set; point it at a JSONL file or glob of input rows")
        if settings.student_model is None:
            raise ConfigError("MOPD_STUDENT_MODEL is not set; name the student model or its local directory")
    return settings
