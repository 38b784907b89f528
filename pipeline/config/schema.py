"""The schema: typed dataclasses for every section of an experiment, their validation, and the
typed construction from plain data (:func:`from_dict`, :func:`to_dict`).

Every problem is raised as :class:`ConfigError` with a one-line message that starts with the
dotted key, e.g. ``sgtm.domains[0].heads: 40 forget heads but the model has 32 heads``. Where the
forget domains sit is :mod:`pipeline.config.placement`; reading YAML, fragments and overrides is
:mod:`pipeline.config.composition`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.codes import STRATEGIES
from pipeline.config.placement import DomainConfig, assign_domains, check_kv_heads
from pipeline.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


# Family presets: what ``model.arch`` fills in for every architecture feature left unset. A new
# family is a row here (plus, at most, one new layer in pipeline/model/transformer.py).
# ``query_heads_per_kv_head``: the default n_kv_heads is n_heads divided by it (1: multi-head).
PRESETS: dict[str, dict] = {
    "gpt-neo": {"norm": "layernorm", "positions": "learned", "mlp": "gelu", "bias": True,
                "tie_embeddings": True, "rope_theta": 10000.0, "query_heads_per_kv_head": 1},
    "llama": {"norm": "rmsnorm", "positions": "rope", "mlp": "swiglu", "bias": False,
              "tie_embeddings": False, "rope_theta": 10000.0, "query_heads_per_kv_head": 1},
    "llama3": {"norm": "rmsnorm", "positions": "rope", "mlp": "swiglu", "bias": False,
               "tie_embeddings": False, "rope_theta": 500000.0, "query_heads_per_kv_head": 4},
    # llama3 whose MLPs are mixture-of-experts layers (pipeline/model/moe.py): 8 experts, top-2.
    "llama3-moe": {"norm": "rmsnorm", "positions": "rope", "mlp": "swiglu", "bias": False,
                   "tie_embeddings": False, "rope_theta": 500000.0, "query_heads_per_kv_head": 4,
                   "n_experts": 8},
}


@dataclass
class ModelConfig:
    """Architecture: a family preset (``arch``, see :data:`PRESETS`) whose features any key may
    override. gpt-neo: learned positions, LayerNorm, GELU, biases, tied embeddings. llama: RoPE,
    RMSNorm, SwiGLU, no biases, untied LM head. llama3: llama with grouped-query attention (4
    query heads per KV head unless ``n_kv_heads`` is given) and RoPE theta 500000."""

    arch: Literal["gpt-neo", "llama", "llama3", "llama3-moe"] = "gpt-neo"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 8
    # KV heads (grouped-query attention when fewer than n_heads; 1: multi-query). Default: preset.
    n_kv_heads: int | None = None
    d_ff: int | None = None  # default 4 * d_model
    norm: Literal["layernorm", "rmsnorm"] | None = None  # default: preset
    positions: Literal["learned", "rope"] | None = None  # default: preset
    mlp: Literal["gelu", "swiglu"] | None = None  # default: preset (swiglu: a unit owns gate + up rows)
    vocab_size: int = 50257
    max_seq_len: int = 256
    pad_vocab_to_multiple: int = 128  # megatron pads the vocab so every TP shard is equal
    norm_eps: float = 1e-5
    rope_theta: float | None = None  # default: preset
    init_std: float = 0.02
    tie_embeddings: bool | None = None  # default: preset
    bias: bool | None = None  # default: preset
    # Attention stays inside each document: every training batch (one with modes) must carry
    # doc_ids. false: the model ignores doc_ids, so attention crosses the documents of a packed row
    # (still causal and still masked by modes, so isolation holds; docs/architecture.md,
    # "Document masking"); a document's first token is still never a target of the one before.
    document_masking: bool = True
    # Mixture of experts (pipeline/model/moe.py; docs/architecture.md, "Mixture of experts"): with
    # n_experts > 0 each block's MLP is n_experts routed experts of width d_ff (top moe_top_k per
    # token) plus moe_shared_experts always-on experts (one MLP of width moe_shared_experts * d_ff,
    # split into units like the dense MLP). 0: dense. Default: preset (llama3-moe: 8).
    n_experts: int | None = None
    moe_top_k: int = 2
    moe_shared_experts: int = 0
    # Tokens an expert takes per micro-batch: ceil(factor * tokens * top_k / n_experts); the rest
    # of its assignments are dropped (non-forget tokens first, then by router probability or
    # position, moe_drop_policy). None: dropless.
    moe_capacity_factor: float | None = None
    moe_drop_policy: Literal["probs", "position"] = "probs"
    moe_aux_loss_coef: float = 0.01  # switch-style load-balancing loss, over non-forget tokens

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        preset = PRESETS.get(self.arch, PRESETS["gpt-neo"])  # an unknown arch is refused by validation
        for name in ("norm", "positions", "mlp", "bias", "tie_embeddings", "rope_theta"):
            if getattr(self, name) is None:
                setattr(self, name, preset[name])
        if self.n_experts is None:
            self.n_experts = preset.get("n_experts", 0)
        if self.n_kv_heads is None:
            per_kv = preset["query_heads_per_kv_head"]
            self.n_kv_heads = self.n_heads // per_kv if self.n_heads % per_kv == 0 else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_units(self) -> int:
        """Units of the (TP-split) dense MLP: d_ff, or in an MoE model the shared experts' MLP
        (moe_shared_experts * d_ff; 0 without shared experts). Forget ``units`` index these."""
        return self.d_ff if not self.n_experts else self.moe_shared_experts * self.d_ff

    @property
    def query_heads_per_kv_head(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple
        return -(-self.vocab_size // m) * m

    def validate(self, key: str = "model") -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "max_seq_len",
                     "pad_vocab_to_multiple"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"{key}.n_heads: {self.n_heads} does not divide d_model={self.d_model}")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{key}.n_kv_heads: must be a positive divisor of n_heads={self.n_heads}, "
                              f"got {self.n_kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"{key}.n_heads: RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("norm_eps", "init_std", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be positive, got {getattr(self, name)}")
        preset_theta = PRESETS.get(self.arch, PRESETS["gpt-neo"])["rope_theta"]
        if self.positions == "learned" and self.rope_theta != preset_theta:
            raise ConfigError(f"{key}.rope_theta: only RoPE uses it and {key}.positions is 'learned'; "
                              f"got {self.rope_theta:g}, expected the preset's {preset_theta:g}")
        if self.n_experts:
            self._validate_moe(key)
        else:
            self._refuse_moe_keys(key)

    def _refuse_moe_keys(self, key: str) -> None:
        """A dense model would silently ignore the MoE keys: refuse any set away from its default."""
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        for name in ("moe_top_k", "moe_shared_experts", "moe_capacity_factor", "moe_drop_policy", "moe_aux_loss_coef"):
            if getattr(self, name) != defaults[name]:
                raise ConfigError(f"{key}.{name}: only an MoE model uses it and {key}.n_experts is 0 (dense); "
                                  f"got {getattr(self, name)!r}, expected the default {defaults[name]!r}")

    def _validate_moe(self, key: str) -> None:
        if self.n_experts < 2:
            raise ConfigError(f"{key}.n_experts: expected 0 (dense) or >= 2, got {self.n_experts}")
        if not 1 <= self.moe_top_k <= self.n_experts:
            raise ConfigError(f"{key}.moe_top_k: expected 1..n_experts={self.n_experts}, got {self.moe_top_k}")
        if self.moe_shared_experts < 0:
            raise ConfigError(f"{key}.moe_shared_experts: must be >= 0, got {self.moe_shared_experts}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            raise ConfigError(f"{key}.moe_capacity_factor: must be positive (or null: dropless), "
                              f"got {self.moe_capacity_factor}")
        if self.moe_aux_loss_coef < 0:
            raise ConfigError(f"{key}.moe_aux_loss_coef: must be >= 0, got {self.moe_aux_loss_coef}")


@dataclass
class SGTMConfig:
    # One of pipeline.codes.STRATEGIES (the strategies of its MAY_UPDATE table).
    strategy: Literal[STRATEGIES] = "sgtm"
    domains: list[DomainConfig] = field(default_factory=lambda: [DomainConfig()])
    # May forget-labelled tokens update joint parameters (norms, final norm, LM head)?
    joint_update: Literal["all", "non_forget"] = "non_forget"
    # Embeddings are joint; their policy defaults to joint_update (the paper masks them on
    # Wikipedia and lets them learn jointly on TinyStories).
    embedding_update: Literal["all", "non_forget"] | None = None
    # 'joint' makes W_O, W_2 and their biases joint (a paper variant) instead of split.
    output_projections: Literal["split", "joint"] = "split"
    # Where forget parameters live. 'mlp' has no forget heads and 'attention' no forget units: a
    # domain's dropped key (heads, units) must then be 0, [] or left at its default.
    scope: Literal["attention_mlp", "attention", "mlp"] = "attention_mlp"
    # How attention treats a context that crosses a forget/non-forget boundary inside a document
    # (docs/architecture.md, "Isolation across mode boundaries"). 'segment': attention breaks at
    # every such boundary (exact, no extra cost). 'detached_context': forget queries still read
    # earlier non-forget keys/values, detached (exact, keeps context, ~2x attention cost).
    cross_mode_attention: Literal["segment", "detached_context"] = "segment"
    # MoE models (pipeline/model/moe.py): how a forget:d token picks its top-k experts. 'free': by
    # router probability, like every token. 'own_first': domain d's forget experts of the block
    # first (by probability), the remaining slots by probability, so forget tokens always reach
    # the experts that may learn from them (sgtm strategy only). Other tokens are unaffected.
    moe_forget_routing: Literal["free", "own_first"] = "free"

    def __post_init__(self) -> None:
        if self.embedding_update is None:
            self.embedding_update = self.joint_update


@dataclass
class EngineConfig:
    """How the model is distributed and run: DeepSpeed + megatron-core tensor parallelism."""

    tensor_parallel: int = 1
    zero_stage: Literal[0, 1, 2] = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    grad_clip: float = 0.0  # 0 disables clipping
    # per_partition: retain+joint and each forget[d] get their own norm and clip coefficient, so
    # forget data cannot scale retain updates. global: DeepSpeed's usual clipping.
    clip_mode: Literal["per_partition", "global"] = "per_partition"
    # Process-group timeout: a rank blocked in a collective whose peer died gives up after this
    # many seconds with an error naming the timeout (torch's default is 30 minutes).
    dist_timeout_s: float = 1800.0
    # Megatron-style sequence parallelism inside the TP group (norms and the residual stream hold
    # seq/tp tokens per rank); needs tensor_parallel > 1 and model.max_seq_len divisible by it.
    sequence_parallel: bool = False
    # Expert parallelism (MoE models): the routed experts of every block are split over this many
    # ranks, which share their batch like TP ranks (tokens split among them and dispatched by
    # all-to-all; pipeline/model/moe.py). Nested with TP: one of the two divides the other.
    expert_parallel: int = 1
    # DeepSpeed pipeline stages (PipelineModule over a pipe x data x model topology); must divide
    # model.n_layers; ZeRO 0/1 only (DeepSpeed's pipeline engine). docs/architecture.md, "Pipeline".
    pipeline_parallel: int = 1

    def validate(self, key: str = "engine") -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "expert_parallel", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be positive, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ConfigError(f"{key}.grad_clip: must be >= 0, got {self.grad_clip}")
        if not 0 < self.dist_timeout_s < float("inf"):
            raise ConfigError(f"{key}.dist_timeout_s: must be positive, got {self.dist_timeout_s}")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise ConfigError(f"{key}.sequence_parallel: needs {key}.tensor_parallel > 1, got {self.tensor_parallel}")
        if self.pipeline_parallel > 1 and self.zero_stage not in (0, 1):
            raise ConfigError(f"{key}.zero_stage: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 with "
                              f"{key}.pipeline_parallel={self.pipeline_parallel}, got {self.zero_stage}")


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio

    def validate(self, key: str = "optimizer") -> None:
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"{key}.lr: must be positive and finite, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{key}.betas: each must be in [0, 1), got {list(self.betas)}")
        for name in ("weight_decay", "warmup_steps", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.eps <= 0:
            raise ConfigError(f"{key}.eps: must be positive, got {self.eps}")


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    log_every: int = 10
    # A step whose loss or gradients are not finite is never applied. 'stop': the run stops with
    # the step number and the batch's sources (resume from the last checkpoint); 'skip': the
    # step is skipped, counted (metrics `nonfinite` records, checkpointed) and training goes on.
    nonfinite: Literal["skip", "stop"] = "stop"

    def validate(self, key: str = "train") -> None:
        if self.steps <= 0:
            raise ConfigError(f"{key}.steps: must be positive, got {self.steps}")
        if self.log_every <= 0:
            raise ConfigError(f"{key}.log_every: must be positive, got {self.log_every}")
        if self.seed < 0:
            raise ConfigError(f"{key}.seed: must be >= 0, got {self.seed}")


@dataclass
class CalibrationConfig:
    """Logit calibration: fit only a per-vocabulary output bias on the ablated model's logits, on
    loss_forget + alpha * loss_retain + beta * loss_adjacent (paper: alpha = 100; beta = 100 on
    Wikipedia), so ablation cannot fake a high forget loss by shifting the output distribution."""

    steps: int = 150
    # sgd: momentum 0.9 on the weight-normalised loss (the default; see fit_calibration_bias).
    # adam (lr ~0.05): over-fits rare tokens at CPU scale (measured: held-out retain 4.58 -> 4.62).
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 5.0
    alpha: float = 100.0
    beta: float = 0.0
    batches: int = 16  # batches per set used to fit the bias
    tokens_per_step: int = 2048  # tokens per set in each optimizer step (a seeded minibatch)
    # 'train': training-split text (as the paper; plenty of it). 'heldout': the eval split (small:
    # a per-vocabulary bias over-fits it, pushing down every token it lacks).
    split: Literal["train", "heldout"] = "train"


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations; 0: only at the end
    batches: int = 4  # held-out batches per set (forget / retain / adjacent)
    batch_size: int = 8
    calibrate: bool = True
    # Which evaluations fit the calibration (eval.calibration.steps steps each time): 'every' one,
    # or only the 'final' one (final.json, the demo's table); earlier ones then report full and
    # ablated loss only, so intermediate curves cost no calibration.
    calibrate_at: Literal["every", "final"] = "every"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self, key: str = "eval") -> None:
        for name in ("batches", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be positive, got {getattr(self, name)}")
        if not self.calibrate and self.calibrate_at != "every":
            raise ConfigError(f"{key}.calibrate_at: {self.calibrate_at!r} has no effect with {key}.calibrate=false "
                              f"(no evaluation calibrates); remove it or set {key}.calibrate=true")
        if self.every < 0:
            raise ConfigError(f"{key}.every: must be >= 0, got {self.every}")
        c = self.calibration
        for name in ("steps", "alpha", "beta"):
            if getattr(c, name) < 0:
                raise ConfigError(f"{key}.calibration.{name}: must be >= 0, got {getattr(c, name)}")
        for name in ("lr", "batches", "tokens_per_step"):
            if getattr(c, name) <= 0:
                raise ConfigError(f"{key}.calibration.{name}: must be positive, got {getattr(c, name)}")


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only at the end (and on SIGTERM)
    keep: int = 2  # complete checkpoints kept (older ones are deleted)

    def validate(self, key: str = "checkpoint") -> None:
        if self.every < 0:
            raise ConfigError(f"{key}.every: must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"{key}.keep: must be >= 1, got {self.keep}")


@dataclass
class WandbConfig:
    """Optional Weights & Biases mirror of metrics.jsonl, from rank 0. Needs the ``wandb`` package
    (``pip install 'sgtm-pipeline[wandb]'``), imported only when enabled. 'offline' needs no
    network: the run is written under ``<run_dir>/wandb`` (upload later with ``wandb sync``)."""

    enabled: bool = False
    mode: Literal["offline", "online"] = "offline"
    project: str = "sgtm"
    entity: str | None = None
    name: str | None = None  # default: the experiment name
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    # Progress on stderr (rank 0): 'auto' = a progress bar on a terminal, else one plain line per
    # train.log_every steps (SLURM logs); 'bar', 'lines' force one; 'none' prints nothing.
    console: Literal["auto", "bar", "lines", "none"] = "auto"
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, key: str = "logging") -> None:
        if self.wandb.enabled and not self.wandb.project:
            raise ConfigError(f"{key}.wandb.project: expected a non-empty string")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    sgtm: SGTMConfig = field(default_factory=SGTMConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str | None = None  # default: runs/<name>

    def validate(self) -> ExperimentConfig:
        """Cross-section checks, the forget domains' placement included (:func:`assign_domains`)."""
        self.model.validate()
        self.engine.validate()
        self.optimizer.validate()
        self.train.validate()
        self.eval.validate()
        self.checkpoint.validate()
        self.logging.validate()
        if self.run_dir is None:
            self.run_dir = f"runs/{self.name}"
        names = [d.name for d in self.sgtm.domains]
        if self.data is not None and self.data.domains != names:
            raise ConfigError(f"data.domains: {self.data.domains} must equal the sgtm.domains names {names}")
        tp = self.engine.tensor_parallel
        if self.engine.sequence_parallel and self.model.max_seq_len % tp:
            raise ConfigError(f"engine.sequence_parallel: model.max_seq_len={self.model.max_seq_len} is not "
                              f"divisible by engine.tensor_parallel={tp}")
        if self.model.n_heads % tp:
            raise ConfigError(
                f"engine.tensor_parallel: {tp} does not divide model.n_heads={self.model.n_heads}")
        check_kv_heads(self.model, tp)
        if self.model.d_ff % tp:
            raise ConfigError(f"engine.tensor_parallel: {tp} does not divide model.d_ff={self.model.d_ff}")
        if self.model.pad_vocab_to_multiple % tp:
            raise ConfigError(
                f"engine.tensor_parallel: {tp} does not divide "
                f"model.pad_vocab_to_multiple={self.model.pad_vocab_to_multiple}")
        pp = self.engine.pipeline_parallel
        if pp > 1:
            if self.model.n_layers % pp:
                raise ConfigError(f"engine.pipeline_parallel: {pp} does not divide "
                                  f"model.n_layers={self.model.n_layers}")
            if self.model.tie_embeddings:
                raise ConfigError(f"model.tie_embeddings: tied embeddings across pipeline stages are not supported "
                                  f"with engine.pipeline_parallel={pp}; set model.tie_embeddings=false")
            if self.eval.calibrate:
                raise ConfigError(f"eval.calibrate: logit calibration is not supported with "
                                  f"engine.pipeline_parallel={pp}; set eval.calibrate=false")
        check_moe(self.model, self.sgtm, self.engine)
        assign_domains(self.model, self.sgtm)  # raises ConfigError naming the sgtm key
        return self


def check_moe(model: ModelConfig, sgtm: SGTMConfig, engine: EngineConfig) -> None:
    """What an MoE model (or expert parallelism) needs from the other sections."""
    ep, tp = engine.expert_parallel, engine.tensor_parallel
    if ep > 1 and not model.n_experts:
        raise ConfigError(f"engine.expert_parallel: {ep} needs an MoE model (model.n_experts > 0)")
    if ep > 1 and model.n_experts % ep:
        raise ConfigError(f"engine.expert_parallel: {ep} does not divide model.n_experts={model.n_experts}")
    if ep > 1 and ep % tp and tp % ep:
        raise ConfigError(f"engine.expert_parallel: {ep} and engine.tensor_parallel={tp} must nest "
                          f"(one divides the other: the EP group lies inside the TP group or contains it)")
    if not model.n_experts:
        if sgtm.moe_forget_routing != "free":
            raise ConfigError(f"sgtm.moe_forget_routing: only an MoE model routes tokens and model.n_experts is 0 "
                              f"(dense); got {sgtm.moe_forget_routing!r}, expected 'free'")
        return
    if engine.sequence_parallel:
        raise ConfigError("engine.sequence_parallel: not supported with an MoE model (model.n_experts > 0) yet")
    if getattr(engine, "pipeline_parallel", 1) > 1:
        raise ConfigError("engine.pipeline_parallel: not supported with an MoE model (model.n_experts > 0) yet")
    if sgtm.strategy == "gradient_routing":
        raise ConfigError("sgtm.strategy: gradient_routing is not defined for MoE models (model.n_experts > 0); "
                          "use sgtm, activation_masking or none")
    if sgtm.moe_forget_routing == "own_first" and sgtm.strategy != "sgtm":
        raise ConfigError(f"sgtm.moe_forget_routing: own_first needs sgtm.strategy sgtm, got {sgtm.strategy!r}")


# --------------------------------------------------------------------------------------------
# Data section (consumed by pipeline/data: loader, tagging)
# --------------------------------------------------------------------------------------------


def _fraction(value: float | None, key: str, open_low: bool = False) -> None:
    if value is not None and not (0 < value <= 1 if open_low else 0 <= value <= 1):
        raise ConfigError(f"{key}: expected a number in {'(0' if open_low else '[0'}, 1], got {value!r}")


def check_role(role: str, domains: list[str], key: str) -> str:
    """A true label as configs write it: 'retain', 'adjacent' or 'forget:<domain>'."""
    if role in ("retain", "adjacent") or (role.startswith("forget:") and role[7:] in domains):
        return role
    raise ConfigError(f"{key}: expected 'retain', 'adjacent' or 'forget:<one of {domains}>', got {role!r}")


@dataclass
class SourceConfig:
    path: str  # shard directory (manifest.json + tars) written by `sgtm data shard`
    weight: float = 1.0  # share of tokens drawn from this source (before filtering), relative
    tags: str | None = None  # sidecar directory written by `sgtm data tag` (needed for classifier tagging)
    true_label: str | None = None  # ground truth for every document of the source, e.g. 'forget:spanish'


@dataclass
class TaggingConfig:
    """How per-document tags become modes.

    source=classifier: the tag sidecars' probabilities go through the thresholds.
    source=simulated: true labels plus the paper's controlled noise (per document, seeded by `seed`).
    Both: a confident-retain document gets RETAIN with probability `retain_fraction`, else UNLABELLED.
    """

    source: Literal["simulated", "classifier"] = "simulated"
    forget_threshold: float = 0.5  # P(forget:d) >= this -> forget:d
    retain_threshold: float = 0.5  # P(retain) >= this -> retain candidate
    adjacent_threshold: float = 0.5  # P(adjacent) >= this -> dropped by the strict filter
    retain_fraction: float = 0.25  # share of confident-retain docs put in RETAIN mode (paper: 0.10-0.25)
    undiscovered_rate: float = 0.0  # simulated: share of true forget docs left UNLABELLED (1 - recall)
    false_positive_rate: float = 0.0  # simulated: share of true non-forget docs tagged forget
    precision: float | None = None  # simulated: alternative to false_positive_rate (converted with counts)
    # paragraph: each paragraph (split at blank lines) gets its own mode: the classifier's spans, or
    # the simulator's per-paragraph draws at the same rates; the filters then drop tagged spans.
    granularity: Literal["document", "paragraph"] = "document"
    seed: int = 0  # seeds every per-document draw (independent of the loader's shuffling seed)

    def validate(self, key: str) -> None:
        for name in ("forget_threshold", "retain_threshold", "adjacent_threshold", "retain_fraction",
                     "undiscovered_rate", "false_positive_rate"):
            _fraction(getattr(self, name), f"{key}.{name}")
        _fraction(self.precision, f"{key}.precision", open_low=True)
        if self.seed < 0:
            raise ConfigError(f"{key}.seed: expected an integer >= 0, got {self.seed}")
        if self.precision is not None and self.false_positive_rate:
            raise ConfigError(f"{key}.precision: give either precision or false_positive_rate, not both")
        if self.source == "classifier":  # the simulator's noise keys would be ignored
            for name, default in (("undiscovered_rate", 0.0), ("false_positive_rate", 0.0), ("precision", None)):
                if getattr(self, name) != default:
                    raise ConfigError(f"{key}.{name}: only the simulated source draws label noise and {key}.source "
                                      f"is 'classifier'; got {getattr(self, name)!r}, expected {default!r}")


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    domains: list[str]  # forget domains, in the order of sgtm.domains (mode FORGET+d); filled from sgtm
    tokenizer: str = "gpt2"  # 'gpt2' or a tokenizer .json; must match every manifest's hash
    # weak: drop forget-tagged documents (paragraph granularity: forget-tagged spans); strict: also adjacent
    filter: Literal["none", "weak", "strict"] = "none"
    tagging: TaggingConfig = field(default_factory=TaggingConfig)
    heldout_fraction: float = 0.05  # documents held out of training (by key hash) for evaluation
    shuffle_buffer: int = 2048  # documents in each worker's shuffle buffer
    num_workers: int = 0  # DataLoader worker processes per rank (0: read in the training process)
    epochs: int | None = None  # None: cycle forever; N: stop after N passes (then a padded last batch)
    skip_bad_shards: bool = False  # count and report corrupt shards instead of failing
    # Keep only documents whose true label is in this list (e.g. ['forget:spanish'] for an
    # attacker's forget-only stream); None keeps everything.
    keep_true: list[str] | None = None

    @classmethod
    def from_dict(cls, raw: Any, key: str = "data") -> DataConfig:
        """Typed construction plus the checks below; every error is one line naming the key."""
        if isinstance(raw, DataConfig):
            return raw
        if isinstance(raw, dict):
            for name in ("sources", "domains"):
                if not isinstance(raw.get(name), list) or not raw.get(name):
                    raise ConfigError(f"{key}.{name}: expected a non-empty list")
        cfg = from_dict(cls, raw, key, hook=False)
        cfg.validate(key)
        return cfg

    def validate(self, key: str = "data") -> None:
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"{key}.domains: duplicate names in {self.domains}")
        for name in ("tokenizer",):
            if not getattr(self, name):
                raise ConfigError(f"{key}.{name}: expected a non-empty string")
        for i, src in enumerate(self.sources):
            if not src.path:
                raise ConfigError(f"{key}.sources[{i}].path: expected a non-empty string")
            if not src.weight > 0:
                raise ConfigError(f"{key}.sources[{i}].weight: expected a positive number, got {src.weight:g}")
            if src.true_label is not None:
                check_role(src.true_label, self.domains, f"{key}.sources[{i}].true_label")
            if self.tagging.source == "classifier" and src.tags is None:
                raise ConfigError(f"{key}.sources[{i}].tags: required when {key}.tagging.source is 'classifier'")
        for i, role in enumerate(self.keep_true or []):
            check_role(role, self.domains, f"{key}.keep_true[{i}]")
        if self.keep_true is not None and not self.keep_true:
            raise ConfigError(f"{key}.keep_true: expected a non-empty list of true labels")
        self.tagging.validate(f"{key}.tagging")
        _fraction(self.heldout_fraction, f"{key}.heldout_fraction")
        for name, low in (("shuffle_buffer", 1), ("num_workers", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{key}.{name}: expected an integer >= {low}, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"{key}.epochs: expected an integer >= 1, got {self.epochs}")

    def to_dict(self) -> dict:
        return to_dict(self)


# --------------------------------------------------------------------------------------------
# Generic typed construction from plain dicts
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it; raise ConfigError on misfit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own error is the precise one
            return _convert(arms[0], value, key)
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(arm, value, key)
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[-1])
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _convert(args[1] if args else Any, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:  # not NaN
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type, data: Any, key: str, hook: bool = True) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys, missing required keys and
    wrong types. A section class with its own ``from_dict`` (extra checks) is used when ``hook``."""
    if isinstance(data, cls):
        return data
    if hook and "from_dict" in vars(cls):
        return cls.from_dict(data, key)
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in fields:
            raise ConfigError(f"{sub}: unknown key (expected one of {sorted(fields)})")
        kwargs[name] = _convert(hints[name], value, sub)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}.{name}: required" if key else f"{name}: required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (for YAML/JSON dumps and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
