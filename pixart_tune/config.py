"""Recipe configuration: YAML file + dotted `key=value` overrides -> one typed, validated `Config`.

Every problem in a recipe is reported at once, each naming its dotted key: unknown keys come with
the closest valid key as a suggestion, wrong types with the type that was expected. The resolved
config is written into the run directory (`config.yaml`); training from that file reproduces the run.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """One or more problems in a recipe; `problems` holds one human-readable line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


class _Section(BaseModel):
    # extra="forbid": a mistyped key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    base: str = Field(
        "embedded:tiny",
        description="Hub id, local folder in the Hub layout, or 'embedded:tiny' (built offline by the package).",
    )
    revision: str | None = None
    # Storage dtype of the frozen weights (transformer base, VAE, T5) during caching and training.
    weight_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


class DataConfig(_Section):
    path: str = "data/sample"
    source: Literal["auto", "folder", "metadata", "hf", "webdataset"] = "auto"
    resolution: Literal[256, 512, 1024] = 1024  # which PixArt aspect-ratio table buckets images
    image_column: str = "image"
    caption_column: str = "text"
    split: str = "train"
    trigger: str | None = None  # trigger word put in front of every caption (see caption_template)
    caption_template: str = "{trigger}, {caption}"
    clean_caption: bool = False  # PixArt's caption cleaning (needs bs4 + ftfy); same at cache and inference
    max_tokens: int = Field(120, ge=1)
    random_crop: bool = False
    crop_variants: int = Field(1, ge=1)  # with random_crop: crops cached per image, each a training item
    flip: bool = False
    on_error: Literal["skip", "error"] = "skip"
    cache_dir: str | None = None  # default: <data.path>/.pixart_tune_cache (or under output_dir for Hub data)
    encode_batch_size: int = Field(8, ge=1)
    num_workers: int = Field(4, ge=0)  # image-decoding worker processes while caching (0 = in process)
    t5_dtype: Literal["fp32", "bf16"] = "fp32"  # never fp16: T5 overflows in fp16
    t5_quantization: Literal["none", "8bit", "4bit"] = "none"


class LoraConfig(_Section):
    rank: int = Field(16, ge=1)
    alpha: float | None = None  # None -> alpha = rank (scale 1.0), so other tools read the same strength
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: str | list[str] = "attention+ff"  # preset name or explicit module-name list
    dora: bool = False
    rslora: bool = False


class TrainConfig(_Section):
    method: Literal["lora", "full"] = "lora"
    freeze: list[str] = []  # full fine-tune: module-name prefixes kept frozen, e.g. [pos_embed, caption_projection]
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "came", "prodigy"] = "adamw"
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    noise_offset: float = Field(0.0, ge=0.0)
    snr_gamma: float | None = None
    # VLB term training the learned-variance half. None = by method: 1.0 for full fine-tunes (as the
    # official trainer, which keeps the variance head calibrated), 0.0 for LoRA (as the official LoRA
    # script; the diffusers pipeline's DPM-Solver discards the variance channels).
    vlb_weight: float | None = Field(None, ge=0.0)
    gradient_checkpointing: bool = False
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)  # EMA of the trained weights; None = off
    ema_on_cpu: bool = False
    compile: Literal["none", "regional", "full"] = "none"  # regional = each transformer block
    # SDPA kernel preference; fa4 = FlashAttention-4 for the self-attention (pip install flash-attn-4;
    # Hopper/Blackwell), cuDNN for the rest; auto = fa4 where it is installed on a Hopper+ GPU, else
    # cudnn on CUDA, else SDPA's own choice (speed.resolve_attention)
    attention: Literal["auto", "cudnn", "flash", "efficient", "math", "fa4"] = "auto"
    # LoRA only: the LoRA'd self-attention q/k/v and feed-forward layers run their frozen-weight
    # matmuls in FP8 (e4m3, one scale per row; fp8.py), fastest on Hopper; slightly different numerics
    # (README, Performance). Needs fused_lora.
    fp8: bool = False
    # LoRA: the adapter's up-projection and gradient sums ride in the base layer's matmuls
    # (lora_fused.py; the same maths as peft's forward). false = peft's own forward.
    fused_lora: bool = True
    # The cross-attention's q and out projections folded into the caption's keys and values
    # (cross_attention.py; the same maths): much less work for captions up to 64 tokens, where it is
    # used; longer ones run diffusers' attention as with false.
    fold_cross_attention: bool = True
    # With bf16 mixed precision: the blocks' residual stream stays bf16 where fp32 adaLN tables (full
    # fine-tunes, fp32-weight LoRA) would make it fp32 (stream.py); the tables' masters stay fp32.
    bf16_stream: bool = True
    # On Hopper with quack installed (flash-attn-4 brings it): the blocks' feed-forward, GELU and its
    # gradient included, and FA4's q/k/v and out projections run on quack's GEMMs (quack_gemm.py): plain
    # linears (a full fine-tune's, frozen ones), LoRA feed-forwards and the LoRA q/k/v projection (its
    # adapter joined to the reduction); the LoRA out projection keeps its own fused kernel.
    quack_gemms: bool = True
    log_every: int = Field(10, ge=1)
    log_with: Literal["tensorboard", "none"] = "tensorboard"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML reads an unquoted `no` as false

    @model_validator(mode="after")
    def _fp8_needs_frozen_weights(self):
        if self.fp8 and self.method != "lora":
            raise ValueError("fp8 is for LoRA runs (it quantises the frozen base weights); set train.fp8=false")
        if self.fp8 and not self.fused_lora:
            raise ValueError("train.fp8 runs inside the fused LoRA linears; set train.fused_lora=true (the default)")
        return self
    checkpoint_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(3, ge=1)


class ValidationConfig(_Section):
    prompts: list[str] = []  # empty = no validation images
    seeds: list[int] = [0]
    every: int | None = Field(None, ge=1)  # steps; None = only at the end (when prompts are given)
    steps: int = Field(20, ge=1)
    guidance_scale: float = 4.5
    height: int | None = None  # None = the model's default size (1024 for 1024-MS)
    width: int | None = None

    @field_validator("height", "width")
    @classmethod
    def _whole_patches(cls, v: int | None) -> int | None:
        # An explicit size is generated as is: the VAE divides it by 8 and the transformer's patches by 2.
        if v is not None and (v < 16 or v % 16):
            lower, upper = max(16, v // 16 * 16), max(16, (v + 15) // 16 * 16)
            raise ValueError(f"must be a multiple of 16, at least 16 (the VAE's factor 8 times the patch size 2); use "
                             f"{lower if lower == upper else f'{lower} or {upper}'}")  # fmt: skip
        return v


class Config(_Section):
    output_dir: str = "runs/default"
    seed: int = 0
    resume: str | None = None  # 'latest' or a checkpoint folder (output_dir/checkpoints/step-N)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    validation: ValidationConfig = ValidationConfig()

    @field_validator("output_dir")
    @classmethod
    def _a_folder(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if Path(v).exists() and not Path(v).is_dir():
            raise ValueError("is a file, not a folder: give the folder the run writes into (created if missing)")
        return v

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# Loading, overrides and error reporting


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """All dotted keys a recipe may set, e.g. ['output_dir', 'model.base', ...]."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=5e-5' -> ('train.lr', 5e-05); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError("command line", [f"override {text!r} is not of the form key=value"])
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping of keys",
    "model_type": "a mapping of keys",
    "list_type": "a list",
}


# Names other trainers (diffusers scripts, kohya, peft) use for our keys: suggestions match these too.
_ALIASES = {
    "lr": ["learning_rate", "learningrate"],
    "steps": ["max_train_steps", "max_steps", "num_steps", "train_steps"],
    "batch_size": ["train_batch_size", "batchsize", "bs"],
    "grad_accum": ["gradient_accumulation_steps", "accumulation_steps"],
    "max_grad_norm": ["grad_clip", "clip_grad_norm", "gradient_clipping"],
    "rank": ["r", "lora_rank", "network_dim", "dim"],
    "alpha": ["lora_alpha", "network_alpha"],
    "lr_scheduler": ["scheduler", "lr_schedule"],
    "warmup_steps": ["lr_warmup_steps", "warmup"],
    "mixed_precision": ["precision", "dtype"],
    "snr_gamma": ["min_snr_gamma"],
    "caption_dropout": ["proportion_empty_prompts", "caption_dropout_rate", "caption_dropout_probability"],
    "base": ["pretrained_model_name_or_path", "model", "pretrained"],
    "path": ["train_data_dir", "data_dir", "dataset"],
    "output_dir": ["output", "out_dir", "run_dir"],
}


def suggest_key(key: str) -> str | None:
    """The valid dotted key closest to an unknown one, by its name or a common alias of it."""
    section, _, leaf = key.rpartition(".")
    best, best_score = None, 0.0
    for candidate in valid_keys() + sorted({k.split(".")[0] for k in valid_keys() if "." in k}):
        c_section, _, c_leaf = candidate.rpartition(".")
        names = [c_leaf, *_ALIASES.get(c_leaf, [])]
        score = max(difflib.SequenceMatcher(None, leaf.lower(), n).ratio() for n in names)
        score += 0.1 if c_section == section else 0.0  # prefer the section the user wrote
        if score > best_score:
            best, best_score = candidate, score
    return best if best_score >= 0.6 else None


def _describe(err: dict) -> str:
    # Drop pydantic's union-branch markers such as 'str' / 'list[str]' from the location.
    key = ".".join(str(p) for p in err["loc"] if str(p) not in ("str", "list[str]", "int", "float"))
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        close = suggest_key(key)
        hint = f"; did you mean '{close}'?" if close else ""
        return f"unknown key '{key}'{hint}"
    if kind in _TYPE_WORDS:
        return f"'{key}' expects {_TYPE_WORDS[kind]}, got {got!r}"
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"'{key}' must be one of {allowed}, got {got!r}"
    if kind == "value_error":  # our validators' own words, without pydantic's "Value error, " in front
        said = str(err.get("ctx", {}).get("error", err["msg"]))
        return f"'{key}': {said}" + ("" if isinstance(got, dict) else f" (got {got!r})")  # a section: its keys are named
    return f"'{key}': {err['msg']} (got {got!r})"


def config_from_dict(tree: dict, source: str = "recipe") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            line = _describe(err)
            if line not in problems:
                problems.append(line)
        raise ConfigError(source, problems) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a recipe YAML (or start from defaults), apply overrides, validate.

    `overrides` is either a list of 'dotted.key=value' strings (values parsed as YAML) or a dict
    of dotted keys to values. Raises ConfigError listing every problem at once.
    """
    source = str(path) if path else "defaults"
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(source, [f"recipe file not found: {p}"])
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(source, ["the top level must be a mapping of keys"])
        tree = loaded
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(tree, key, value)
    if overrides:
        source += " (with overrides)"
    return config_from_dict(tree, source)


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.dump(), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
