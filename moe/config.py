"""Configuration: one dataclass per concern, TOML presets, type-checked dotted overrides.

A config file has one table per section (`[model]`, later `[train]`, `[data]`, ...). Command
lines override any field with `--model.n_layers=4`. Values are parsed as TOML literals and
checked against the dataclass field types; nothing is ever exec'd or eval'd. Every problem is
a `ConfigError` whose one-line message names the key, the value and what was expected.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
import types
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message is one line."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class VisionConfig:
    """The vision branch (Flamingo-style): a ViT, a Perceiver resampler, gated cross-attention."""

    image_size: int = 32  # images are resized to image_size x image_size
    channels: int = 3  # 3: RGB, 1: grey
    patch_size: int = 4  # (image_size / patch_size)^2 patches per image
    d_vision: int = 128  # the encoder's and the resampler's width
    vit_layers: int = 4
    vit_heads: int = 4
    n_latents: int = 8  # visual tokens per image, whatever its size
    resampler_layers: int = 2
    xattn_every: int = 1  # a gated cross-attention block before text layers 0, n, 2n, ...
    max_images: int = 4  # images one sequence may hold

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "patch_size", "d_vision", "vit_layers", "vit_heads",
                     "n_latents", "resampler_layers", "xattn_every", "max_images"):
            value = getattr(self, name)
            _require(value > 0, f"model.vision.{name}={value}: must be a positive integer")
        _require(self.image_size % self.patch_size == 0,
                 f"model.vision.image_size={self.image_size} is not divisible by "
                 f"model.vision.patch_size={self.patch_size}")
        _require(self.d_vision % self.vit_heads == 0,
                 f"model.vision.d_vision={self.d_vision} is not divisible by model.vision.vit_heads={self.vit_heads}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ModelConfig:
    """The transformer's shape. Defaults are the `small` preset (the CPU default)."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 1  # 1: multi-query; n_heads: multi-head; in between: grouped-query
    max_seq_len: int = 256
    # Mixture of experts. n_experts=1, top_k=1 is a dense model (every FFN a plain SwiGLU).
    n_experts: int = 16
    top_k: int = 2
    d_ff: int = 512  # hidden size of each expert (and of the dense FFN in non-MoE layers)
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0; 1 = every layer
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25  # used by dispatch = "capacity"
    expert_impl: Literal["auto", "grouped_mm", "split", "loop"] = "auto"
    router_jitter: float = 0.0  # multiplicative input noise U(1-j, 1+j) in training (Switch)
    aux_loss_coef: float = 0.01  # load-balancing loss weight
    z_loss_coef: float = 0.001  # router z-loss weight
    # Positions, norms, embeddings (Mixtral's conventions, so checkpoints export exactly).
    rope_theta: float = 10000.0
    rope_scale: float = 1.0  # position interpolation: positions are divided by this
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # A `[model.vision]` table adds the vision branch; without one the model reads text only.
    vision: VisionConfig | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "max_seq_len", "n_experts", "top_k", "d_ff", "moe_every"):
            value = getattr(self, name)
            _require(value > 0, f"model.{name}={value}: must be a positive integer")
        for name in ("capacity_factor", "rope_theta", "rope_scale", "norm_eps", "init_std"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, f"model.{name}={value}: must be > 0")
        for name in ("router_jitter", "aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, f"model.{name}={value}: must be >= 0")
        _require(self.router_jitter < 1, f"model.router_jitter={self.router_jitter}: must be < 1")
        _require(self.d_model % self.n_heads == 0,
                 f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        _require(self.head_dim % 2 == 0,
                 f"model.d_model / model.n_heads = {self.head_dim}: rotary embeddings need an even head dim")
        _require(self.top_k <= self.n_experts,
                 f"model.top_k={self.top_k} exceeds model.n_experts={self.n_experts}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """One expert is a plain FFN: such a model is dense, with no router at all."""
        return self.n_experts > 1 and (layer + 1) % self.moe_every == 0

    def has_xattn(self, layer: int) -> bool:
        """Whether a gated cross-attention block sits before text layer `layer`."""
        return self.vision is not None and layer % self.vision.xattn_every == 0


@dataclass
class DataConfig:
    """What to train on. Built-in sources: `docs` (pydoc topics) and `code` (the stdlib's .py files)."""

    # source -> epochs: each source is sampled in proportion to its tokens x epochs. A source is
    # `docs`, `code`, or a local .txt / .jsonl / .parquet file or a directory of them.
    sources: dict[str, float] = field(default_factory=lambda: {"docs": 2.0, "code": 4.0})
    text_field: str = "text"  # the column holding text in JSONL / Parquet files
    instruct: str = ""  # a JSONL file of {"prompt", "response"}: fine-tune on it, loss on responses only
    # Image-caption training (needs [model.vision]): `digits`, `shapes`, `scenes` or `mixed` (synthetic,
    # made on the fly), or a folder with captions.jsonl. The text sources then only train the tokenizer.
    images: str = ""
    caption_eval_examples: int = 256  # held-out synthetic images caption accuracy is measured on
    val_fraction: float = 0.01  # the tail of each source held out for validation
    cache_dir: str = "~/.cache/moe"  # trained tokenizers and tokenised corpora, reused across runs
    tokenizer_sample_mb: float = 8.0  # how much of the corpus trains the BPE tokenizer

    def __post_init__(self) -> None:
        _require(bool(self.sources) or bool(self.instruct), "data.sources: empty (name at least one source)")
        for name, epochs in self.sources.items():
            _require(math.isfinite(epochs) and epochs > 0, f"data.sources.{name}={epochs}: epochs must be > 0")
        _require(0 < self.val_fraction < 0.5, f"data.val_fraction={self.val_fraction}: must be in (0, 0.5)")
        _require(self.tokenizer_sample_mb > 0, f"data.tokenizer_sample_mb={self.tokenizer_sample_mb}: must be > 0")
        _require(self.caption_eval_examples > 0,
                 f"data.caption_eval_examples={self.caption_eval_examples}: must be a positive integer")
        _require(not (self.images and self.instruct), "data.images and data.instruct exclude each other")


@dataclass
class TrainConfig:
    """The optimisation. Defaults: `python train.py` trains `small` on a 2-core CPU in ~10 minutes."""

    max_steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step once ramped up
    batch_size_start: int = 4  # sequences per step at the start of the ramp
    ramp_tokens: int = 400_000  # tokens over which the batch grows linearly to batch_size (0 = no ramp)
    micro_batch_size: int = 8  # sequences per forward/backward; more per step are accumulated
    lr: float = 2e-3
    min_lr: float = 2e-4  # the cosine decays to this
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # The matmuls' dtype. bf16: autocast, with fp32 weights, gradients and AdamW state, and the
    # router, norms, softmaxes and losses in fp32. auto: bf16 where the device multiplies it faster
    # than fp32 (CUDA sm80+; CPUs with avx512_bf16 or AMX, found by a probe), else fp32.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # A step whose loss or gradient is not finite is skipped (counted, logged); this many in a row
    # roll the weights and optimizer back to the last good checkpoint, and training goes on
    # past the data that broke them.
    max_bad_steps: int = 3
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 8
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    sample_tokens: int = 200  # generated at the end of the run (0 = none)
    tensorboard: bool = False  # also log to OUT/tensorboard (the tensorboard extra), beside metrics.jsonl
    freeze_lm: bool = False  # train only the vision branch (Flamingo): the text model stays as it was
    gate_lr_scale: float = 10.0  # the vision branch's tanh gates learn this many times faster
    # The ViT and the resampler keep their random initial weights for this many steps, while the
    # cross-attention learns to read their (already informative) features; see Trainer.train_step.
    encoder_hold_steps: int = 200
    # Under torchrun (more than one process): how the ranks share the work. `ddp` replicates the
    # model, `zero1` also shards the optimizer state (ZeroRedundancyOptimizer), `fsdp` shards
    # parameters, gradients and optimizer state (FSDP2). expert_parallel = N splits each MoE
    # layer's experts over groups of N ranks (tokens travel by all_to_all), with `ddp` only.
    parallel: Literal["ddp", "zero1", "fsdp"] = "ddp"
    expert_parallel: int = 1
    # Tensor and pipeline parallelism (docs/distributed.md): the processes form one DeviceMesh of
    # dp x pp x tp, dp = processes / (pp * tp) data-parallel replicas laid out by `parallel`.
    tp: int = 1  # query heads, FFN hidden units and experts divided among tp ranks (Megatron-style)
    pp: int = 1  # pipeline stages of whole blocks, one per rank (two with pp_schedule = interleaved)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    pp_microbatches: int = 4  # pipeline micro-batches each micro_batch_size sequences are cut into
    pp_first_stage_layers: int = 0  # blocks on the first (embedding) stage; 0: split evenly
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "batch_size_start", "micro_batch_size", "log_every",
                     "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "expert_parallel",
                     "max_bad_steps", "tp", "pp", "pp_microbatches"):
            value = getattr(self, name)
            _require(value > 0, f"train.{name}={value}: must be a positive integer")
        for name in ("ramp_tokens", "warmup_steps", "sample_tokens", "encoder_hold_steps", "pp_first_stage_layers"):
            value = getattr(self, name)
            _require(value >= 0, f"train.{name}={value}: must be >= 0")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "gate_lr_scale"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, f"train.{name}={value}: must be >= 0")
        _require(self.lr > 0, f"train.lr={self.lr}: must be > 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"train.{name}={value}: must be in [0, 1)")
        _require(self.expert_parallel == 1 or self.parallel == "ddp",
                 f"train.expert_parallel={self.expert_parallel} combines with train.parallel='ddp' only "
                 f"(got {self.parallel!r})")
        _require(self.batch_size_start <= self.batch_size,
                 f"train.batch_size_start={self.batch_size_start} exceeds train.batch_size={self.batch_size}")
        if self.tp > 1 or self.pp > 1:
            _require(self.expert_parallel == 1,
                     f"train.expert_parallel={self.expert_parallel} combines with data parallelism only: under "
                     f"train.tp the experts are already divided among the tensor-parallel ranks")
        if self.pp > 1:
            _require(self.pp_schedule == "gpipe" or self.pp_microbatches >= self.pp,
                     f"train.pp_schedule={self.pp_schedule!r} needs train.pp_microbatches >= train.pp={self.pp} "
                     f"(got {self.pp_microbatches}); gpipe takes fewer")
            _require(self.micro_batch_size % self.pp_microbatches == 0,
                     f"train.pp_microbatches={self.pp_microbatches} does not divide "
                     f"train.micro_batch_size={self.micro_batch_size}")

    @property
    def pp_stages(self) -> int:
        """Pipeline stages in all: two per rank for the interleaved schedule."""
        return self.pp * (2 if self.pp_schedule == "interleaved" and self.pp > 1 else 1)


@dataclass
class Config:
    """Everything a run needs, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        """What the training layout asks of the model's shape."""
        model, train = self.model, self.train
        tp, stages = train.tp, train.pp_stages
        check_tensor_parallel(model, tp, "train.tp")
        if tp > 1 or train.pp > 1:
            _require(model.vision is None, "train.tp and train.pp split the text model only: train a vision "
                     "model with data parallelism (train.parallel)")
        if train.pp > 1:
            _require(stages <= model.n_layers, f"train.pp={train.pp} makes {stages} pipeline stages "
                     f"(schedule {train.pp_schedule}) for model.n_layers={model.n_layers}: at most one per layer")
            _require(not model.tie_embeddings, "train.pp: model.tie_embeddings would share the first stage's "
                     "embedding with the last stage's head; untie them")
            first = train.pp_first_stage_layers
            _require(first <= model.n_layers - (stages - 1),
                     f"train.pp_first_stage_layers={first} leaves fewer than one layer for each of the other "
                     f"{stages - 1} stages of model.n_layers={model.n_layers}")


def check_tensor_parallel(model: ModelConfig, tp: int, key: str) -> None:
    """That the model's layers divide among tp ranks (`model.tensor_parallel`)."""
    if tp == 1:
        return
    _require(model.n_heads % tp == 0, f"{key}={tp} does not divide model.n_heads={model.n_heads}")
    _require(model.n_kv_heads == 1 or model.n_kv_heads % tp == 0,
             f"{key}={tp} does not divide model.n_kv_heads={model.n_kv_heads} (a single key/value "
             f"head is replicated; several are divided)")
    _require(model.d_ff % tp == 0, f"{key}={tp} does not divide model.d_ff={model.d_ff}")
    _require(model.n_experts == 1 or model.n_experts % tp == 0,
             f"{key}={tp} does not divide model.n_experts={model.n_experts}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML preset (a path, or a name in `configs/`) and apply `section.key=value` overrides.

    >>> load_config("tiny", ["model.n_layers=3"]).model.n_layers
    3
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        file = resolve_config_path(path)
        source = str(file)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid TOML ({e})") from None
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    try:
        return _build(Config, raw, prefix="")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A Config from plain data (a checkpoint's config.json), checked like a file, plus overrides."""
    raw = json.loads(json.dumps(raw))  # a private deep copy
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    return _build(Config, raw, prefix="")


def resolve_config_path(path: str | Path) -> Path:
    """`tiny` or `tiny.toml` means `configs/tiny.toml`; anything else is a file path."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    preset = CONFIG_DIR / (candidate.name if candidate.suffix == ".toml" else f"{candidate.name}.toml")
    if candidate.parent == Path(".") and preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"config {str(path)!r} not found (a TOML file, or a preset: {presets})")


def parse_override(item: str) -> tuple[str, Any]:
    """`model.n_layers=4` -> ("model.n_layers", 4). The value is a TOML literal, else a string."""
    key, sep, text = item.removeprefix("--").partition("=")
    _require(bool(sep) and bool(key), f"override {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words such as `capacity` are strings
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        _require(isinstance(node, dict), f"{key}: {section} is not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a dict, checking every key and type on the way."""
    _require(isinstance(raw, dict), f"{prefix.rstrip('.') or 'config'}: expected a table, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
    kwargs = {}
    for key, value in raw.items():
        typ = _optional_dataclass(hints[key])
        if is_dataclass(typ):
            kwargs[key] = None if value is None else _build(typ, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, typ)
    return cls(**kwargs)


def _optional_dataclass(typ: Any) -> Any:
    """`VisionConfig | None` -> VisionConfig: an optional section is built when present."""
    if get_origin(typ) is types.UnionType:
        options = [t for t in get_args(typ) if t is not type(None)]
        if len(options) == 1 and is_dataclass(options[0]):
            return options[0]
    return typ


def _check_type(key: str, value: Any, typ: Any) -> Any:
    origin = get_origin(typ)
    if origin is dict:
        key_type, value_type = get_args(typ)
        _require(isinstance(value, dict), f"{key}={value!r}: expected a table")
        return {_check_type(f"{key}.{k}", k, key_type): _check_type(f"{key}.{k}", v, value_type)
                for k, v in value.items()}
    if origin is Literal:
        choices = get_args(typ)
        _require(value in choices, f"{key}={value!r}: expected one of {', '.join(map(repr, choices))}")
        return value
    if origin is types.UnionType:  # `int | None` and the like
        for option in get_args(typ):
            if option is type(None) and value is None:
                return None
            try:
                return _check_type(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {typ}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    _require(ok, f"{key}={value!r}: expected {typ.__name__}, got {type(value).__name__}")
    return value
