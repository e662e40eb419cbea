"""One typed, strict config tree: YAML file + `section.key=value` overrides.

Unknown keys and bad values are errors that name the key, so a typo never silently
falls back to a default. The tree travels to Ray workers as a plain dict.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    path: str  # a local folder or a hub id
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class QuantizationConfig(_Strict):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class LoraConfig(_Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    use_dora: bool = False
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r


Format = Literal["instruction", "alpaca", "prompt_completion", "messages", "text"]


class DatasetSource(_Strict):
    # `split` is the YAML key, `hub_split` the attribute (pipeline specs already use "split" for train/eval);
    # both spellings validate, so a dumped config loads back.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True, validate_by_alias=True)

    # .jsonl, .json, .parquet (file or folder), HF save_to_disk folder; local, NFS or s3://. Or a hub
    # dataset read by `datasets.load_dataset`: a hub id (`org/name`), a local dataset repo folder, or
    # a builder (`json`, `parquet`, ...) with `data_files` (rule: sft_ray.data.sources.is_hub).
    path: str
    format: Format = "instruction"
    fields: dict[str, str] = {}  # the format's field name -> this dataset's column name
    weight: float = Field(1.0, gt=0)  # train mixing: 2.0 repeats every row twice, 0.5 keeps a seeded half
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"  # messages only
    # `datasets.load_dataset` arguments, for hub datasets only:
    hub_split: str | None = Field(None, alias="split", min_length=1)  # None: "train"
    subset: str | None = Field(None, validation_alias=AliasChoices("subset", "name"), min_length=1)  # HF `name=`
    data_files: str | list[str] | None = None  # files or globs, relative to the folder/repo (a builder: the cwd)
    revision: str | None = Field(None, min_length=1)  # a hub branch, tag or commit

    @field_validator("hub_split", "subset", "data_files", "revision")
    @classmethod
    def _hub_only(cls, v, info: ValidationInfo):
        if v is None:
            return v
        if v == []:
            raise ValueError("give at least one file or glob pattern")
        path = info.data.get("path") or ""
        if "://" in path or path.rstrip("/").lower().endswith((".jsonl", ".json", ".parquet")):
            key = {"hub_split": "split"}.get(info.field_name, info.field_name)
            raise ValueError(
                f"{key} is a datasets.load_dataset argument, only for a dataset read through it (a hub id like "
                f"org/name, a local dataset folder, or a builder such as json with data_files); path {path} is "
                "a file or URI read directly"
            )
        return v


class DataConfig(_Strict):
    train: list[DatasetSource] = Field(min_length=1)
    eval: list[DatasetSource] = []
    eval_fraction: float = Field(0.0, ge=0, lt=1)  # carve eval rows out of train (seeded) when eval is empty
    max_length: int = Field(512, gt=1)
    packing: bool = False
    # `chatml` (built in: for a base model, its tokens are added and trained) or a Jinja file used
    # instead of the tokenizer's own template.
    chat_template: str | None = None
    # Passed to every render of the template, and what inference must pass too (e.g. {enable_thinking: false}).
    chat_template_kwargs: dict[str, Any] = {}
    on_bad_row: Literal["error", "skip"] = "error"
    max_dropped_fraction: float = Field(0.05, ge=0, le=1)  # refuse to train when more rows were dropped
    seed: int = 42  # eval carving and weighted sampling

    @model_validator(mode="after")
    def _one_eval_source(self):
        if self.eval and self.eval_fraction:
            raise ValueError("set either data.eval (files) or data.eval_fraction (carved from train), not both")
        return self


class EarlyStoppingConfig(_Strict):
    """Stop when eval loss has not improved by more than min_delta for `patience` evaluations;
    final/ then holds the best evaluation's weights (train/early_stop.py)."""

    patience: int = Field(gt=0)
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(_Strict):
    learning_rate: float = Field(2.0e-4, gt=0)
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)  # when set, overrides epochs
    warmup: float = Field(0.0, ge=0)  # below 1: a fraction of the steps; from 1: a number of steps
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the last checkpoint
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []  # rank 0 logs; see train/tracking.py
    per_device_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    logging_steps: int = Field(10, gt=0)
    eval_steps: int = Field(50, gt=0)
    save_steps: int = Field(50, gt=0)
    seed: int = 42
    samples: int = Field(3, ge=0)  # held-out prompts generated before and after training
    early_stopping: EarlyStoppingConfig | None = None


class ScalingConfig(_Strict):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    # ddp: every worker holds the whole model. fsdp: FSDP2 shards weights, gradients and optimizer
    # state over the workers, one unit per decoder layer (train/fsdp.py).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    cpu_offload: bool = False  # fsdp on GPUs: sharded weights, gradients and optimizer state live in CPU memory


class EvalConfig(_Strict):
    """Generation on held-out prompts: `sft-ray eval` (sft_ray/evaluation/) and, when
    `exact_match_rows` is set, the exact-match share measured at every evaluation during training."""

    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.0, ge=0)  # 0: greedy; above 0: sampled, seeded by `seed`
    seed: int = 0
    batch_size: int = Field(16, gt=0)  # prompts per generate call (left-padded)
    replicas: int | None = Field(None, gt=0)  # model replicas (generation actors); None: scaling.num_workers
    engine: Literal["transformers", "vllm"] = "transformers"  # vllm: on GPUs, the `vllm` extra
    # Held-out rows generated at every evaluation during training, logged as eval_exact_match
    # (what tune.metric=exact_match ranks trials by); 0: none.
    exact_match_rows: int = Field(0, ge=0)


class StorageConfig(_Strict):
    path: str = "runs"  # local/NFS folder; relative paths resolve against the working directory
    keep_checkpoints: int = Field(2, gt=0)


class SearchDim(_Strict):
    """One searched key: exactly one of the kinds, each mapped to the `ray.tune` function of that name."""

    choice: list[Any] | None = Field(None, min_length=1)  # sampled at random
    grid: list[Any] | None = Field(None, min_length=1)  # every value, for each of num_samples
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None  # [low, high): high excluded, as in tune.randint

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)}; got {kinds or 'none'}")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"{kinds[0]}: the low bound must be below the high bound; got {list(bounds)}")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: the bounds must be positive; got {list(self.loguniform)}")
        return self


class SchedulerConfig(_Strict):
    type: Literal["asha", "fifo"] = "asha"  # fifo: every trial runs to the end
    grace_period: int = Field(1, gt=0)  # reports (evaluations) before a trial can be stopped
    reduction_factor: float = Field(2, gt=1)  # at each rung, only the best 1/reduction_factor go on


class SweepConfig(_Strict):
    # eval_loss: reported at every evaluation. exact_match: the share of eval.exact_match_rows held-out
    # prompts answered with the reference exactly, generated at every evaluation.
    metric: Literal["eval_loss", "exact_match"] = "eval_loss"
    mode: Literal["min", "max"] | None = None  # may be left out: it follows from the metric (`direction`)
    num_samples: int = Field(1, gt=0)
    max_concurrent_trials: int | None = Field(None, gt=0)  # None: as many as the cluster's CPUs/GPUs fit
    scheduler: SchedulerConfig = SchedulerConfig()
    space: dict[str, SearchDim] = Field(min_length=1)  # dotted config keys, as in command-line overrides

    @model_validator(mode="after")
    def _mode_of_metric(self):
        if self.mode not in (None, self.direction):
            raise ValueError(
                f"tune.mode: {self.metric} is better when {'higher' if self.direction == 'max' else 'lower'}: "
                f"set mode: {self.direction}, or leave it out"
            )
        return self

    @property
    def direction(self) -> str:
        """min for eval_loss, max for exact_match (never stored: a changed metric brings its own)."""
        return "max" if self.metric == "exact_match" else "min"

    @property
    def reported(self) -> str:
        """The key the workers report the metric under."""
        return "eval_exact_match" if self.metric == "exact_match" else "eval_loss"


class Config(_Strict):
    # `a/b` nests a run under a folder: a sweep's trials are `<sweep>/trials/<trial id>`.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")
    model: ModelConfig
    quantization: QuantizationConfig | None = None
    lora: LoraConfig | None = LoraConfig()  # null: full fine-tuning, every weight trained and saved
    data: DataConfig
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    eval: EvalConfig = EvalConfig()
    tune: SweepConfig | None = None  # a hyperparameter sweep (`sft-ray tune`); ignored by `sft-ray train`

    @model_validator(mode="after")
    def _combinations(self):
        """Combinations that cannot train, refused before any worker starts."""
        s = self.scaling
        if self.lora is None and self.quantization is not None:
            raise ValueError(
                "quantization (QLoRA) trains an adapter over frozen 4-bit weights: set lora, or quantization: null"
            )
        if s.strategy == "fsdp" and s.num_workers < 2:
            raise ValueError(
                "scaling.strategy=fsdp shards the model over the workers: set scaling.num_workers >= 2, or use ddp"
            )
        if s.cpu_offload and s.strategy != "fsdp":
            raise ValueError("scaling.cpu_offload moves FSDP shards to CPU memory: it needs scaling.strategy=fsdp")
        if s.strategy == "fsdp" and self.lora is not None and self.data.chat_template == "chatml":
            raise ValueError(
                "data.chat_template=chatml trains the embedding rows of its new tokens next to the adapter (PEFT "
                "trainable tokens), which FSDP cannot shard (measured: mixed Tensor and DTensor in PEFT's index_copy): "
                "use scaling.strategy=ddp, the model's own chat template, or lora: null (full fine-tuning)"
            )
        stop, t = self.train.early_stopping, self.train
        if stop is not None and not (self.data.eval or self.data.eval_fraction):
            raise ValueError("train.early_stopping stops on eval loss: set data.eval (files) or data.eval_fraction")
        if stop is not None and t.save_steps != t.eval_steps:
            raise ValueError(
                "train.early_stopping keeps the best evaluation's checkpoint, so every evaluation needs one: set "
                f"train.save_steps equal to train.eval_steps (now {t.save_steps} and {t.eval_steps})"
            )
        if self.eval.engine == "vllm" and not s.use_gpu:
            raise ValueError("eval.engine=vllm runs on GPUs: set scaling.use_gpu=true, or eval.engine=transformers")
        if self.eval.engine == "vllm" and self.lora is None:
            raise ValueError(
                "eval.engine=vllm serves the base with the adapter as a LoRA request; a fully fine-tuned model "
                "(lora: null) is evaluated with eval.engine=transformers"
            )
        if self.eval.engine == "vllm" and self.lora is not None and (self.lora.use_dora or self.lora.r > 512):
            raise ValueError(
                "eval.engine=vllm serves LoRA adapters of rank <= 512 without DoRA: use eval.engine=transformers"
            )
        if self.eval.engine == "vllm" and self.model.dtype == "float32":
            raise ValueError(
                "eval.engine=vllm: its LoRA kernels do not run in float32; set model.dtype (auto, bfloat16, float16) "
                "or use eval.engine=transformers"
            )
        if self.eval.engine == "vllm" and self.data.chat_template == "chatml":
            raise ValueError(
                "eval.engine=vllm cannot serve the token rows ChatML trains next to the adapter (PEFT trainable "
                "tokens): use eval.engine=transformers"
            )
        if self.eval.exact_match_rows and not (self.data.eval or self.data.eval_fraction):
            raise ValueError(
                "eval.exact_match_rows generates held-out prompts: set data.eval (files) or data.eval_fraction"
            )
        if self.eval.exact_match_rows and any(src.format == "text" for src in self.data.eval or self.data.train):
            raise ValueError(
                "eval.exact_match_rows answers held-out prompts, and text rows have none (every token is trained): "
                "evaluate prompt/response data, or set eval.exact_match_rows: 0"
            )
        if self.tune is not None and self.tune.metric == "exact_match" and not self.eval.exact_match_rows:
            raise ValueError(
                "tune.metric=exact_match ranks trials by answers generated at every evaluation: set "
                "eval.exact_match_rows (held-out prompts per evaluation, e.g. 32)"
            )
        if s.cpu_offload and not s.use_gpu:
            raise ValueError("scaling.cpu_offload: the workers train on CPUs already (scaling.use_gpu=false)")
        return self

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.split("/")[0] == "datasets":
            raise ValueError("'datasets' is reserved for prepared data under storage.path")
        return v


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{'.'.join(keys[: i + 1])}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings; values are parsed as YAML (so `3`, `1e-4`, `[a, b]`, `null` work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            reason = getattr(err, "problem", None) or err
            raise ConfigError(f"override '{item}': the value is not valid YAML ({reason})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _keys_beside(loc: tuple) -> list[str]:
    """The valid keys of the section that holds the key at `loc`."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int) or part not in model.model_fields:
            continue  # a list index or a dict key (sweep dimensions)
        inner = [model.model_fields[part].annotation]
        while inner and not (isinstance(inner[0], type) and issubclass(inner[0], BaseModel)):
            inner = [*inner[1:], *get_args(inner[0])]  # unwrap `X | None`, `list[X]`, `dict[str, X]`
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str, overrides: list[str]) -> str:
    given = {item.partition("=")[0].strip(): item for item in overrides}
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _keys_beside(e["loc"]), n=1)
            msg = "unknown key" + (f" (did you mean {close[0]}?)" if close else "")
        # A value from the command line is blamed on the command line, not on the file.
        origin = next((f" (from the override {given[k]})" for k in given if key == k or key.startswith(k + ".")), "")
        lines.append(f"  {key}: {msg}{origin}")
    return "\n".join(lines)


def validate(tree: dict, source: str = "(dict)", overrides: list[str] = ()) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, list(overrides))) from None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `name` or `namespace/name`, as the hub allows


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Make local paths absolute (Ray storage needs absolute paths; workers run in other folders)."""

    def local(p: str) -> str:
        if "://" in p:
            return p
        return str((base / p).resolve()) if not os.path.isabs(p) else p

    def source(p: str) -> str:
        """A hub dataset id (or a `datasets` builder name) stays as written when no such local path exists."""
        named = HUB_ID.match(p) and not p.endswith((".jsonl", ".json", ".parquet"))
        return p if named and not (base / p).exists() else local(p)

    cfg.storage.path = local(cfg.storage.path)
    for src in cfg.data.train + cfg.data.eval:
        src.path = source(src.path)
    if cfg.data.chat_template and cfg.data.chat_template != "chatml":
        cfg.data.chat_template = local(cfg.data.chat_template)
    # A model path that exists locally is a folder; anything else must be shaped like a hub id.
    model = Path(os.path.expanduser(cfg.model.path))
    if (base / model).exists():
        cfg.model.path = str((base / model).resolve())
    elif not HUB_ID.match(cfg.model.path):
        looked = "" if model.is_absolute() else f" (looked for {base / model})"
        raise ConfigError(f"model.path: {cfg.model.path} is neither a folder{looked} nor a hub id like Qwen/Qwen3-8B")
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Load, override, validate, and resolve relative paths against the current directory."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    apply_overrides(tree, list(overrides))
    return _resolve_paths(validate(tree, str(path), overrides), Path.cwd())
