"""The rlhf_ds configuration: one frozen dataclass tree, loaded from YAML + dotted overrides.

    cfg = load_config("rlhf_ds/recipes/ppo_tiny.yaml", ["algo.kl_coef=0.02", "actor.num_ranks=2"])
    cfg = load_config(None)          # the built-in default recipe, grpo_tiny
    cfg.algo.kl_coef = 1             # raises dataclasses.FrozenInstanceError

Every field is documented where it is declared (`option(default, help)`); `rlhf-ds config fields`
prints them. Enum-like fields are annotated with the `Literal[...]` aliases of rlhf_ds/choices.py, where
every choice list is declared once: the validator and its error message both read the choices from the
alias. Cross-field rules live in rlhf_ds/config_rules.py (`validate`), and only there: the math and the
engine trust a validated config instead of checking the rules again. Derived values (`needs_critic`,
`loss_norm_len`, ...) are properties, never stored.

Imports no torch, ray, deepspeed or vllm.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

from rlhf_ds.choices import (DEFAULT_LOGGERS, TRAINABLE_ROLES, AdvantageEstimator, CudagraphMode, HfDecoder,
                             KlEstimator, KlPlacement, Launcher, LossReduction, LrSchedule, NonfiniteScorePolicy,
                             PlacementStrategy, PolicyLoss, Precision, RolloutBackend, RunLoggerName, Stage,
                             WandbMode)
from rlhf_ds.config_loader import (ConfigError, apply_overrides, build, option, parse_overrides,
                                   section, to_plain, yaml_dump, yaml_load)
from rlhf_ds.config_rules import validate

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "parse_overrides", "validate",
           "list_recipes", "DEFAULT_RECIPE"]

TRAIN_DS_CONFIG = "ds_configs/zero3_train.json"
EVAL_DS_CONFIG = "ds_configs/zero3_inference.json"
DEFAULT_RECIPE = "grpo_tiny"


# ----------------------------------------------------------------------------- roles

@dataclass(frozen=True)
class RoleConfig:
    """One model engine (the reference uses it as is; the other roles extend it)."""
    model_path: str = option("", "HF directory (save_pretrained layout) or 'tiny:<name>' (built "
                                 "locally, cached); '' = role not used")
    tokenizer_path: str = option("", "tokenizer directory; '' = the tokenizer saved with model_path")
    ds_config: str = option(EVAL_DS_CONFIG, "DeepSpeed JSON template (ds_configs/*.json, relative to "
                                            "the repo root or absolute); run-dependent values are "
                                            "filled in from this config")
    num_ranks: int = option(1, "data-parallel ranks (processes / GPUs) of this role", ge=1)
    micro_batch_size: int = option(4, "sequences per forward (and backward) pass per rank", ge=1)
    zero3_leaf_modules: str = option(
        "auto", "modules ZeRO-3 gathers and hooks as one unit: 'auto' = the model's transformer blocks (its "
                "`_no_split_modules`): one gather and one set of hooks per layer, a block's parameters whole at "
                "once; 'none' = every module on its own (DeepSpeed's default: the least gathered at once, "
                "hooks on every linear and norm); or module class names separated by commas")


@dataclass(frozen=True)
class TrainableRoleConfig(RoleConfig):
    """A role with an optimizer: the actor and the critic."""
    ds_config: str = option(TRAIN_DS_CONFIG, "DeepSpeed JSON template (ds_configs/*.json, relative "
                                             "to the repo root or absolute)")
    lr: float = option(1e-6, "peak learning rate (AdamW)", gt=0)
    lr_schedule: LrSchedule = option("constant", "learning-rate decay after warm-up")
    warmup_steps: int = option(0, "optimizer steps of linear warm-up from 0", ge=0)
    min_lr_ratio: float = option(0.0, "floor of linear / cosine decay, as a fraction of lr", ge=0, le=1)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", ge=0)
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW (beta1, beta2)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")


@dataclass(frozen=True)
class RemoteRewardConfig:
    """A reward served over HTTP (`rlhf-ds serve-reward`, or any server of the same JSON schema, docs/rewards.md)."""
    url: str = option("", "scoring endpoint, e.g. http://127.0.0.1:8000/score; '' = off")
    weight: float = option(1.0, "weight of the remote score in the total reward (and in evaluation)")
    batch_size: int = option(64, "samples per POST", ge=1)
    concurrency: int = option(4, "POSTs in flight at once", ge=1)
    timeout_s: float = option(30.0, "deadline of one POST (connection, upload, answer); one past it is not "
                                    "retried and its samples fail", gt=0)
    retries: int = option(3, "further tries of a POST after a connection error or a 5xx answer (never "
                             "after a 4xx or a deadline)", ge=0)
    backoff_s: float = option(0.5, "wait before the first retry, doubled before each next one", ge=0)
    headers: tuple[str, ...] = option((), "extra HTTP headers, each 'Name: value'")
    token: str = option("", "shared secret sent as 'Authorization: Bearer <token>'; '' = the environment "
                            "variable RLHF_DS_REWARD_TOKEN, if set (keeps it out of config.yaml)")


@dataclass(frozen=True)
class RewardConfig(RoleConfig):
    """Reward sources: rule functions and/or the reward-model engine, combined by weights."""
    use_model: bool = option(False, "also score with the reward model at model_path")
    model_weight: float = option(1.0, "weight of the reward-model score in the total reward")
    functions: tuple[str, ...] = option(("exact_match",), "rule reward functions: registry names or "
                                                          "'path/to/file.py:fn'")
    function_weights: tuple[float, ...] = option((), "one weight per function; empty = all 1.0")
    timeout_s: float = option(10.0, "a rule function still running after this is stopped", gt=0)
    failure_value: float = option(0.0, "score of a sample whose rule function raised or timed out (or whose "
                                       "remote request failed)")
    num_workers: int = option(2, "worker processes running the rule functions", ge=1)
    max_failure_fraction: float = option(0.5, "stop the run when more than this fraction of a step's "
                                              "samples fail or time out in one rule function (or at the "
                                              "remote endpoint)", ge=0, le=1)
    import_timeout_s: float = option(60.0, "time allowed to import a reward file (not counted in "
                                           "timeout_s)", gt=0)
    memory_limit_mb: int = option(4096, "address-space limit of each reward worker process; 0 = none", ge=0)
    cpu_time_limit_s: int = option(600, "CPU-time limit of each reward worker process; 0 = none", ge=0)
    nonfinite_model_score: NonfiniteScorePolicy = option(
        "failure_value", "a NaN / inf reward-model score: stop the run, or score the sample failure_value "
                         "(a step where every score is non-finite stops the run either way)")
    correct_score: float = option(1.0, "a held-out response counts as correct (eval/accuracy, eval/pass@k, "
                                       "the SFT stop) when its rule reward, the functions combined by "
                                       "function_weights plus remote.weight times the remote score, is >= "
                                       "this; the built-in functions pay 1.0 for a correct answer. Without "
                                       "functions and remote, exact_match scores evaluation")
    remote: RemoteRewardConfig = section(RemoteRewardConfig, "a reward served over HTTP, scored like one more "
                                                             "rule function (failures, deadlines, weight)")


# ----------------------------------------------------------------------------- data and rollout

@dataclass(frozen=True)
class DataConfig:
    """Prompt datasets."""
    train_path: str = option("synthetic:multiplication", "jsonl | parquet | HF datasets dir | "
                                                         "'synthetic:<task>' (generated locally)")
    eval_path: str = option("", "held-out prompts; '' = the held-out split of the synthetic task")
    prompt_key: str = option("prompt", "column / JSON key holding the prompt text")
    answer_key: str = option("answer", "column / JSON key holding the reference answer")
    apply_chat_template: bool = option(False, "encode each prompt as one user turn in the tokenizer's chat "
                                              "template, ending with the assistant's generation prompt (instruct "
                                              "models); the tokenizer must have a template")
    chosen_key: str = option("chosen", "column / JSON key of the preferred response (`rlhf-ds rm` rows)")
    rejected_key: str = option("rejected", "column / JSON key of the dispreferred response (`rlhf-ds rm` rows)")
    num_train: int = option(20000, "size of a synthetic task's train split", ge=1)
    num_eval: int = option(256, "held-out prompts used per evaluation", ge=1)
    task_seed: int = option(1234, "seed of the synthetic task generator and of its train / eval split")
    prompts_per_step: int = option(32, "prompts drawn per RL step (each gets rollout.n samples)", ge=1)
    shuffle: bool = option(True, "shuffle the prompts every epoch (seeded by `seed`)")


@dataclass(frozen=True)
class VllmConfig:
    """vLLM engine settings (used when rollout.backend = vllm)."""
    enforce_eager: bool = option(False, "disable CUDA graphs / torch.compile (slower decode)")
    cudagraph_mode: CudagraphMode = option("auto", "vLLM CUDA-graph mode; 'auto' = vLLM's default")
    cudagraph_capture_sizes: tuple[int, ...] = option((), "batch sizes captured as CUDA graphs; "
                                                          "empty = vLLM's default list")
    gpu_memory_utilization: float = option(0.5, "fraction of GPU memory for weights + KV cache (on "
                                                "CPU: of host RAM)", gt=0, le=1)
    kv_cache_memory_bytes: int = option(0, "KV-cache size in bytes; 0 = derive from "
                                           "gpu_memory_utilization (set it on CPU)", ge=0)
    tensor_parallel_size: int = option(1, "GPUs per vLLM engine", ge=1)
    enable_sleep_mode: bool = option(False, "release GPU memory between rollouts (colocated runs, "
                                            "GPU only)")
    enable_prefix_caching: bool = option(True, "reuse the KV cache of shared prompt prefixes")


@dataclass(frozen=True)
class RolloutConfig:
    """Response generation."""
    backend: RolloutBackend = option("hf", "generation engine: HF generate or vLLM")
    hf_decoder: HfDecoder = option("static", "decode loop of the hf backend: 'static' = a KV cache allocated "
                                             "once, no per-token generate bookkeeping (Llama / Qwen2; other "
                                             "models fall back), 'generate' = HF generate; same tokens")
    n: int = option(8, "samples per prompt", ge=1)
    temperature: float = option(1.0, "sampling temperature of the rollouts the policy learns from "
                                     "(> 0: log-probs are taken at this temperature)", gt=0)
    top_p: float = option(1.0, "nucleus sampling mass", gt=0, le=1)
    top_k: int = option(-1, "sample from the k most likely tokens; -1 = off")
    max_prompt_len: int = option(32, "prompt tokens kept (longer prompts are refused by the data "
                                     "loader)", ge=1)
    max_response_len: int = option(16, "generated tokens per response at most", ge=1)
    ignore_eos: bool = option(False, "every response runs to max_response_len, eos or not (a fixed amount "
                                     "of work for benchmarks; responses then rarely end in eos)")
    num_engines: int = option(1, "rollout engines of their own, independent of actor.num_ranks (vllm, or hf "
                                 "with hf_in_actor=false); engines inside the actor: one per actor rank", ge=1)
    hf_in_actor: bool = option(True, "hf backend: one engine inside each actor rank's process, weight sync an "
                                     "in-memory copy (not with async_generation, which needs engines of their "
                                     "own); false = engines as their own Ray actors (rollout.num_engines)")
    eval_temperature: float = option(0.0, "temperature of held-out evaluation (0 = greedy)", ge=0)
    async_generation: bool = option(False, "generate the next step's batch while this one trains (one step "
                                           "off-policy; old log-probs recomputed, algo.tis corrects)")
    weight_sync_bucket_mb: int = option(64, "size of the parameter buckets sent actor -> rollout", ge=1)
    vllm: VllmConfig = section(VllmConfig, "vLLM engine settings")


# ----------------------------------------------------------------------------- algorithm

@dataclass(frozen=True)
class AlgoConfig:
    """Advantages, losses and their reduction."""
    advantage_estimator: AdvantageEstimator = option("grpo", "how rewards become advantages")
    loss_reduction: LossReduction = option("token_mean", "how per-token losses of a mini-batch are "
                                                         "averaged (docs/design.md#loss-reduction-by-pre-scaled-advantages)")
    policy_loss: PolicyLoss = option("ppo", "policy objective: PPO clipped surrogate or GSPO")
    clip_low: float = option(0.2, "ratio clipped below at 1 - clip_low", ge=0, lt=1)
    clip_high: float = option(0.2, "ratio clipped above at 1 + clip_high (clip-higher)", ge=0, lt=1)
    dual_clip: float = option(0.0, "dual-clip constant for negative advantages; 0 = off, else > 1")
    kl_estimator: KlEstimator = option("k3", "KL(actor || reference) estimator")
    kl_placement: KlPlacement = option("none", "where the KL penalty goes: not used, a loss term, or "
                                               "subtracted from the reward")
    kl_coef: float = option(0.0, "KL coefficient (initial value when adaptive)", ge=0)
    adaptive_kl: bool = option(False, "adapt kl_coef towards kl_target (proportional controller)")
    kl_target: float = option(0.1, "target KL of the adaptive controller", gt=0)
    kl_horizon: int = option(10000, "horizon (in samples) of the adaptive controller", ge=1)
    entropy_coef: float = option(0.0, "entropy bonus coefficient", ge=0)
    epochs: int = option(1, "passes over each rollout batch", ge=1)
    mini_batch_size: int = option(256, "sequences per optimizer step (global, all ranks)", ge=1)
    gamma: float = option(1.0, "GAE discount", ge=0, le=1)
    lam: float = option(0.95, "GAE lambda", ge=0, le=1)
    value_clip: float = option(0.2, "clip range of the value loss around the old values", ge=0)
    value_loss_coef: float = option(1.0, "weight of the critic's value loss", gt=0)
    whiten_advantages: bool = option(False, "normalise advantages over the whole batch")
    tis: bool = option(False, "truncated importance sampling between rollout and trainer log-probs")
    tis_cap: float = option(2.0, "cap of the truncated importance weight", gt=0)
    loss_norm_len: int = option(0, "constant L of seq_mean_token_sum_norm (token sums are divided by "
                                   "it); 0 = rollout.max_response_len", ge=0)


# ----------------------------------------------------------------------------- cluster and trainer

@dataclass(frozen=True)
class ClusterConfig:
    """Where the role processes run."""
    launcher: Launcher = option("ray", "Ray actors driven by one controller, or SPMD ranks under the "
                                       "deepspeed launcher")
    ray_address: str = option("", "Ray cluster to join; '' = env RAY_ADDRESS, else start a local Ray")
    colocate: bool = option(False, "actor, reference and rollout share the same devices")
    placement_strategy: PlacementStrategy = option("PACK", "Ray placement-group strategy")
    cpus_per_worker: float = option(0.25, "CPUs reserved per Ray worker (fractional on CPU hosts)",
                                    gt=0)
    threads_per_worker: int = option(0, "torch threads of each Ray worker process; 0 = the host's cores over "
                                        "the most workers busy at once in the stages it works in", ge=0)
    call_timeout_s: float = option(1800.0, "deadline of every wait on a worker or rollout engine; a "
                                           "rank that does not answer fails the run", gt=0)
    dist_timeout_s: float = option(600.0, "torch.distributed collective timeout of each role's group",
                                   gt=0)


@dataclass(frozen=True)
class SftConfig:
    """Supervised fine-tuning of the actor: `rlhf-ds sft`, and the warm start before RL (cached). The
    actor's engine settings apply (ranks, micro-batch, ds_config, AdamW settings, lr_schedule)."""
    steps: int = option(0, "maximum SFT optimizer steps; 0 = no warm start", ge=0)
    lr: float = option(3e-3, "SFT peak learning rate (instead of actor.lr)", gt=0)
    batch_size: int = option(128, "sequences per SFT step (global, all ranks)", ge=1)
    target_eval_accuracy: float = option(0.5, "stop once held-out accuracy (the run's rewards reaching "
                                                   "reward.correct_score) reaches this", ge=0, le=1)
    eval_interval: int = option(25, "SFT steps between held-out evaluations", ge=1)
    save_interval: int = option(0, "SFT steps between checkpoints of `rlhf-ds sft` (the RL warm start keeps "
                                   "only its cached result); 0 = only at the end", ge=0)


@dataclass(frozen=True)
class RmConfig:
    """Reward-model training (`rlhf-ds rm`): the model at reward.model_path (reward.num_ranks,
    reward.micro_batch_size pairs per forward) trained on preference pairs with a Bradley-Terry loss."""
    steps: int = option(0, "optimizer steps of `rlhf-ds rm`; 0 = no reward-model training configured", ge=0)
    lr: float = option(1e-3, "peak learning rate (AdamW)", gt=0)
    lr_schedule: LrSchedule = option("constant", "learning-rate decay after warm-up")
    warmup_steps: int = option(0, "optimizer steps of linear warm-up from 0", ge=0)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", ge=0)
    batch_size: int = option(64, "preference pairs per optimizer step (global, all ranks)", ge=1)
    ds_config: str = option(TRAIN_DS_CONFIG, "DeepSpeed JSON template of the trained reward model")
    eval_interval: int = option(50, "steps between held-out pairwise-accuracy evaluations", ge=1)
    save_interval: int = option(0, "steps between checkpoints; 0 = only at the end", ge=0)


@dataclass(frozen=True)
class TrainerConfig:
    """The RL loop: length, logging, evaluation, checkpoints."""
    max_steps: int = option(40, "RL steps (one rollout batch each)", ge=1)
    output_dir: str = option("outputs/run", "metrics, TensorBoard events, checkpoints, resolved config")
    log_interval: int = option(0, "steps between printed summary lines; 0 = about 20 lines per run "
                                  "(max_steps // 20, at least 1)", ge=0)
    eval_interval: int = option(5, "steps between held-out evaluations; 0 = first and last only", ge=0)
    save_interval: int = option(0, "steps between checkpoints; 0 = only at the end", ge=0)
    resume: bool = option(False, "continue from the latest complete checkpoint in output_dir (none yet: start fresh, and say so)")
    allow_resume_changes: tuple[str, ...] = option((), "keys that may differ from the checkpoint's config "
                                                       "on resume although they change the run")
    keep_checkpoints: int = option(3, "complete checkpoints kept (the newest); 0 = keep all", ge=0)
    max_skipped_steps: int = option(3, "abort after this many consecutive non-finite steps", ge=1)
    eval_pass_k: int = option(1, "k > 1: evaluation also draws k samples per held-out prompt at "
                                 "rollout.temperature and reports eval/pass@k, the fraction of prompts with "
                                 "a correct sample among them; eval/accuracy stays one sample at "
                                 "rollout.eval_temperature", ge=1)
    skip_plan: bool = option(False, "start even when `rlhf-ds plan` finds that the run does not fit "
                                    "this machine's memory")
    loggers: tuple[RunLoggerName, ...] = option(DEFAULT_LOGGERS, "where each step's metrics go; jsonl "
                                                                 "(metrics.jsonl) is required")
    wandb_project: str = option("rlhf_ds", "W&B project (with 'wandb' in trainer.loggers)")
    wandb_run_name: str = option("", "W&B run name; '' = the last folder of trainer.output_dir")
    wandb_mode: WandbMode = option("offline", "W&B mode (wins over WANDB_MODE); offline writes the run "
                                              "under output_dir/wandb (or WANDB_DIR) for `wandb sync`")
    sft: SftConfig = section(SftConfig, "supervised fine-tuning (`rlhf-ds sft`, the RL warm start)")
    rm: RmConfig = section(RmConfig, "reward-model training (`rlhf-ds rm`)")


# ----------------------------------------------------------------------------- the root

@dataclass(frozen=True)
class Config:
    """A whole run. Build it with load_config(); it is validated, then immutable."""
    seed: int = option(0, "seed of rollout sampling and data order (tiny models are built from their "
                          "own fixed seed)", ge=0)
    precision: Precision = option("auto", "auto = bf16 on GPU, fp32 on CPU")
    actor: TrainableRoleConfig = section(TrainableRoleConfig, "the policy being trained",
                                         model_path="tiny:llama-arith")
    critic: TrainableRoleConfig = section(TrainableRoleConfig, "value model (used by gae)")
    reference: RoleConfig = section(RoleConfig, "frozen policy for the KL penalty")
    reward: RewardConfig = section(RewardConfig, "reward functions and reward model")
    data: DataConfig = section(DataConfig, "prompt datasets")
    rollout: RolloutConfig = section(RolloutConfig, "generation")
    algo: AlgoConfig = section(AlgoConfig, "advantages and losses")
    cluster: ClusterConfig = section(ClusterConfig, "placement")
    trainer: TrainerConfig = section(TrainerConfig, "the RL loop")

    @property
    def needs_critic(self) -> bool:
        return self.algo.advantage_estimator == "gae"

    @property
    def needs_reference(self) -> bool:
        return self.algo.kl_placement != "none" and self.algo.kl_coef > 0

    @property
    def uses_reward_model(self) -> bool:
        return self.reward.use_model

    @property
    def trainable_roles(self) -> tuple[str, ...]:
        """Names of the roles that take optimizer steps in this run."""
        return TRAINABLE_ROLES if self.needs_critic else ("actor",)

    @property
    def engines_in_actor(self) -> bool:
        """The rollout engines live inside the actor ranks' processes, one per rank: always under the
        deepspeed launcher; under Ray with the hf backend and ``rollout.hf_in_actor``, unless generation
        is asynchronous (it overlaps training, so the engines need processes of their own)."""
        rollout = self.rollout
        return self.cluster.launcher == "deepspeed" or (rollout.backend == "hf" and rollout.hf_in_actor
                                                        and not rollout.async_generation)

    @property
    def on_policy_update(self) -> bool:
        """One optimizer step per rollout batch (one epoch, one mini-batch) and no reference: the actor's
        old log-probs equal the detached log-probs of its training forward, so that forward supplies them
        and the separate old-log-prob pass is skipped (same gradient: the ratio is exactly 1)."""
        batch = self.data.prompts_per_step * self.rollout.n
        return (self.algo.epochs == 1 and self.algo.mini_batch_size >= batch and not self.needs_reference
                and not self.rollout.async_generation)

    @property
    def loss_norm_len(self) -> int:
        """The constant L of seq_mean_token_sum_norm (`algo.loss_norm_len`, 0 resolved)."""
        return self.algo.loss_norm_len or self.rollout.max_response_len

    @property
    def summary_interval(self) -> int:
        """Steps between printed summary lines (`trainer.log_interval`; 0 = about 20 per run)."""
        return self.trainer.log_interval or max(1, self.trainer.max_steps // 20)

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml_dump(self.to_dict())

    def save(self, path: str) -> None:
        """Write the resolved config (loadable again with load_config)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_yaml())


# ----------------------------------------------------------------------------- loading

def list_recipes() -> list[str]:
    """Names of the recipes shipped in rlhf_ds/recipes (without .yaml)."""
    folder = resources.files("rlhf_ds") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_config_text(path: str | None) -> tuple[str, str]:
    """(YAML text, source name) of a file path or of a shipped recipe name."""
    if path is not None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    name = DEFAULT_RECIPE if path is None else os.path.basename(path).removesuffix(".yaml")
    if (path is None or os.sep not in path) and name in list_recipes():
        return (resources.files("rlhf_ds") / "recipes" / f"{name}.yaml").read_text("utf-8"), name
    raise ConfigError(f"config file not found: {path!r}; shipped recipes: {', '.join(list_recipes())}")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), stage: Stage = "rl"
                ) -> Config:
    """Load a YAML file (or a shipped recipe name; None = grpo_tiny), apply overrides, validate for
    ``stage`` (what the config will run: ``rl``, or the ``sft`` / ``rm`` stage alone)."""
    text, source = _read_config_text(path)
    raw = yaml_load(text, source)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got "
                          f"{type(raw).__name__}")
    return config_from_dict(raw or {}, overrides, stage)


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = (), stage: Stage = "rl") -> Config:
    """Build and validate (for ``stage``) a Config from nested dicts (e.g. a parsed YAML) plus overrides."""
    cfg = build(Config, apply_overrides(raw, parse_overrides(overrides)))
    validate(cfg, stage)
    return cfg
