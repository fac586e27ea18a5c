"""The cross-field rules of a config, by what runs it (``validate(cfg, stage)``), and only here: the math
and the engines trust a validated config instead of checking the rules again. Each rule yields the
messages of what it finds wrong; ``validate`` raises one ConfigError listing all of them.

Imports no torch, ray, deepspeed or vllm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from rlhf_ds.choices import (
    BUILTIN_REWARDS,
    GROUP_ESTIMATORS,
    POLICY_LOSS_HOMOGENEOUS,
    PRESCALED_REDUCTIONS,
    REQUIRED_LOGGER,
    RUN_LOGGERS,
    TOKEN_REWARD_ESTIMATORS,
    TRAINABLE_ROLES,
    Stage,
)
from rlhf_ds.config_loader import ConfigError

if TYPE_CHECKING:
    from rlhf_ds.config import Config


def _batch_rules(cfg: Config):
    """The step splits into mini-batches, and those into equal per-rank shares of whole micro-batches
    (the DeepSpeed config and the training step rely on it and do not check again)."""
    algo, rollout_batch = cfg.algo, cfg.data.prompts_per_step * cfg.rollout.n
    if rollout_batch % algo.mini_batch_size:
        yield (f"data.prompts_per_step * rollout.n = {cfg.data.prompts_per_step} * {cfg.rollout.n} = "
               f"{rollout_batch} sequences per step must be divisible by "
               f"algo.mini_batch_size={algo.mini_batch_size}")
    # Trainable roles are covered below (mini-batches divide the step, ranks * micro divide those).
    for name in [r for r in _roles_in_use(cfg) if r not in cfg.trainable_roles]:
        ranks = getattr(cfg, name).num_ranks
        if rollout_batch % ranks:
            yield (f"{name}.num_ranks={ranks} must divide the {rollout_batch} sequences of a step "
                   f"(data.prompts_per_step * rollout.n), which are split evenly over its ranks")
    for name in cfg.trainable_roles:
        role = getattr(cfg, name)
        per_pass = role.num_ranks * role.micro_batch_size
        if algo.mini_batch_size % per_pass:
            yield (f"algo.mini_batch_size={algo.mini_batch_size} must be divisible by "
                   f"{name}.num_ranks * {name}.micro_batch_size = {role.num_ranks} * "
                   f"{role.micro_batch_size} = {per_pass}")


def _estimator_rules(cfg: Config):
    """Group estimators need several samples per prompt; gae needs a critic."""
    algo = cfg.algo
    if algo.advantage_estimator in GROUP_ESTIMATORS and cfg.rollout.n < 2:
        yield (f"algo.advantage_estimator={algo.advantage_estimator!r} normalises within each prompt's "
               f"samples and needs rollout.n >= 2, got rollout.n={cfg.rollout.n} (group estimators: "
               f"{', '.join(GROUP_ESTIMATORS)})")
    if cfg.needs_critic and not cfg.critic.model_path:
        yield "algo.advantage_estimator='gae' needs a critic: set critic.model_path"


def _loss_rules(cfg: Config):
    """What the policy loss and its reduction need (algo.losses / algo.reduction assume them)."""
    algo = cfg.algo
    if (not POLICY_LOSS_HOMOGENEOUS[algo.policy_loss]
            and algo.loss_reduction in PRESCALED_REDUCTIONS):
        homogeneous = [k for k, v in POLICY_LOSS_HOMOGENEOUS.items() if v]
        yield (f"algo.policy_loss={algo.policy_loss!r} is not positively homogeneous in the advantage, "
               f"so algo.loss_reduction={algo.loss_reduction!r} (done by pre-scaling advantages) would "
               f"mis-scale it; homogeneous losses: {', '.join(homogeneous)}")
    if algo.dual_clip != 0 and not algo.dual_clip > 1:
        yield f"algo.dual_clip must be 0 (off) or > 1, got {algo.dual_clip!r}"
    if algo.loss_reduction == "prompt_mean" and algo.mini_batch_size % cfg.rollout.n:
        yield (f"algo.loss_reduction='prompt_mean' needs whole prompt groups in every mini-batch: "
               f"algo.mini_batch_size={algo.mini_batch_size} must be a multiple of rollout.n={cfg.rollout.n}")
    # One set of per-token weights serves actor and critic, and the legacy mode's chunks are micro-batches.
    if (algo.loss_reduction == "token_mean_legacy" and cfg.needs_critic
            and cfg.critic.micro_batch_size != cfg.actor.micro_batch_size):
        yield (f"algo.loss_reduction='token_mean_legacy' averages per micro-batch, and actor and critic "
               f"share its token weights: critic.micro_batch_size={cfg.critic.micro_batch_size} must "
               f"equal actor.micro_batch_size={cfg.actor.micro_batch_size}")


def _kl_rules(cfg: Config):
    """The KL penalty needs a reference, and per-token rewards when it goes into the reward."""
    algo = cfg.algo
    if algo.kl_placement != "none" and not cfg.reference.model_path:
        yield (f"algo.kl_placement={algo.kl_placement!r} needs a reference model: set "
               f"reference.model_path (or algo.kl_placement=none)")
    if algo.kl_placement == "reward" and algo.advantage_estimator not in TOKEN_REWARD_ESTIMATORS:
        yield (f"algo.kl_placement='reward' needs per-token rewards, which "
               f"algo.advantage_estimator={algo.advantage_estimator!r} has not; use one of "
               f"{', '.join(TOKEN_REWARD_ESTIMATORS)} or algo.kl_placement=loss")
    if algo.adaptive_kl and algo.kl_placement == "none":
        yield "algo.adaptive_kl=true has no effect with algo.kl_placement='none'"
    if algo.adaptive_kl and algo.kl_placement != "none" and algo.kl_coef == 0:
        yield "algo.adaptive_kl=true scales algo.kl_coef, which is 0: set an initial algo.kl_coef > 0"


def _reward_rules(cfg: Config):
    reward = cfg.reward
    if reward.use_model and not reward.model_path:
        yield "reward.use_model=true needs reward.model_path"
    if not reward.use_model and not reward.functions and not reward.remote.url:
        yield "no reward source: set reward.functions, reward.remote.url or reward.use_model=true"
    if reward.function_weights and len(reward.function_weights) != len(reward.functions):
        yield (f"reward.function_weights has {len(reward.function_weights)} entries but "
               f"reward.functions has {len(reward.functions)} ({', '.join(reward.functions)})")
    else:
        yield from _correct_score_rules(reward)


def _correct_score_rules(reward):
    """Held-out accuracy counts rewards >= reward.correct_score: refuse a threshold the built-in
    functions (each pays 0 or 1) can never reach, which would report 0 accuracy however the run goes."""
    functions = reward.functions or ("exact_match",)   # evaluation's stand-in without functions
    if reward.remote.url or not all(f in BUILTIN_REWARDS for f in functions):
        return   # a user function's or a remote endpoint's range is unknown
    weights = reward.function_weights if reward.functions and reward.function_weights else (1.0,) * len(functions)
    best = sum(max(w, 0.0) for w in weights)
    if reward.correct_score > best + 1e-9 * max(1.0, best):
        yield (f"reward.correct_score={reward.correct_score} can never be reached: reward.functions "
               f"{list(functions)} (each pays 0 or 1) with weights {list(weights)} pay at most {best:g}, so "
               f"eval/accuracy would stay 0; set reward.correct_score <= {best:g}")


def _remote_rules(cfg: Config):
    """reward.remote: an http(s) URL with a host, and headers the client can send as written."""
    remote = cfg.reward.remote
    if not remote.url:
        return
    parsed = urlsplit(remote.url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        yield (f"reward.remote.url={remote.url!r} must be an http:// or https:// URL with a host, e.g. "
               f"http://127.0.0.1:8000/score (or '' for no remote reward)")
    for header in remote.headers:
        name, sep, _ = header.partition(":")
        if not sep or not name.strip() or name != name.strip() or " " in name:
            yield f"reward.remote.headers: {header!r} is not 'Name: value'"
        elif name.lower() == "authorization" and remote.token:
            yield ("reward.remote.headers sets Authorization and reward.remote.token sends one too: "
                   "keep one of them")


def _runtime_rules(cfg: Config):
    if not cfg.actor.model_path:
        yield "actor.model_path is required"
    if not cfg.trainer.output_dir.strip():
        yield (f"trainer.output_dir must be a non-empty path (metrics and checkpoints go there), got "
               f"{cfg.trainer.output_dir!r}")
    for name in TRAINABLE_ROLES:  # checked even when the critic is unused, like every field bound
        betas = getattr(cfg, name).adam_betas
        if not all(0 <= beta < 1 for beta in betas):
            yield f"{name}.adam_betas must each be in [0, 1), got {list(betas)}"
    if cfg.rollout.backend == "vllm" and (cfg.rollout.top_p < 1 or cfg.rollout.top_k != -1):
        # vLLM reports log-probs of the truncated distribution; the actor recomputes the untruncated one
        yield (f"rollout.backend='vllm' needs rollout.top_p=1 and rollout.top_k=-1 (got {cfg.rollout.top_p}, "
               f"{cfg.rollout.top_k}): vLLM's log-probs after top-p / top-k are those of the truncated "
               f"distribution, which the actor's recomputed log-probs are not")
    if cfg.rollout.top_k != -1 and cfg.rollout.top_k < 1:
        yield f"rollout.top_k must be -1 (off) or >= 1, got {cfg.rollout.top_k}"
    bad_sizes = [s for s in cfg.rollout.vllm.cudagraph_capture_sizes if s < 1]
    if bad_sizes:
        yield f"rollout.vllm.cudagraph_capture_sizes must be >= 1, got {bad_sizes}"


def _in_actor_rules(cfg: Config):
    """Engines inside the actor's processes under Ray (``Config.engines_in_actor``): one per actor rank."""
    engines, ranks = cfg.rollout.num_engines, cfg.actor.num_ranks
    if cfg.cluster.launcher == "ray" and cfg.engines_in_actor and engines not in (1, ranks):
        yield (f"rollout.num_engines={engines}, but with rollout.hf_in_actor=true the hf backend runs one engine "
               f"inside each of the actor's {ranks} rank(s): leave rollout.num_engines at 1 (or {ranks}), or set "
               f"rollout.hf_in_actor=false for {engines} engines of their own")


def _vllm_placement_rules(cfg: Config):
    """Where vLLM engines can sit and how their weights reach them (``cluster.placement``,
    ``rollout.vllm_transfer``)."""
    rollout, vllm = cfg.rollout, cfg.rollout.vllm
    if rollout.backend != "vllm":
        if vllm.enable_sleep_mode:
            yield f"rollout.vllm.enable_sleep_mode=true needs rollout.backend=vllm, got {rollout.backend!r}"
        return
    colocated = cfg.cluster.colocate and cfg.cluster.launcher == "ray"
    if colocated and vllm.tensor_parallel_size > 1:
        yield (f"rollout.vllm.tensor_parallel_size={vllm.tensor_parallel_size} with cluster.colocate=true: a colocated "
               f"engine shares one GPU with one actor rank, and its Ray actor holds that GPU's bundle only; "
               f"set cluster.colocate=false (each engine then gets a bundle of {vllm.tensor_parallel_size} GPUs of "
               f"its own) or rollout.vllm.tensor_parallel_size=1")
    if colocated and rollout.num_engines > cfg.actor.num_ranks:
        yield (f"rollout.num_engines={rollout.num_engines} with cluster.colocate=true but actor.num_ranks="
               f"{cfg.actor.num_ranks}: a colocated engine loads its weights through CUDA IPC from the actor rank on "
               f"its own GPU, and engines {cfg.actor.num_ranks}..{rollout.num_engines - 1} would sit on GPUs with no "
               f"actor rank; set rollout.num_engines <= {cfg.actor.num_ranks}, or cluster.colocate=false")
    if vllm.enable_sleep_mode:
        if not (cfg.cluster.colocate or cfg.cluster.launcher == "deepspeed"):
            yield ("rollout.vllm.enable_sleep_mode=true hands the engines' GPU memory to the roles colocated with "
                   "them while they train: set cluster.colocate=true (engines on GPUs of their own need no sleep)")
        if rollout.async_generation:
            yield ("rollout.vllm.enable_sleep_mode=true with rollout.async_generation=true: the engines sleep while "
                   "the actor trains, and asynchronous generation generates while it trains; choose one")


def _launcher_rules(cfg: Config):
    if cfg.cluster.launcher == "deepspeed":
        # SPMD: every launcher rank holds a shard of every role, so all roles span the same ranks.
        ranks = {name: getattr(cfg, name).num_ranks for name in _roles_in_use(cfg)}
        if len(set(ranks.values())) > 1:
            listed = ", ".join(f"{k}.num_ranks={v}" for k, v in ranks.items())
            yield f"cluster.launcher='deepspeed' runs every role on every rank; got {listed}"


def _logging_rules(cfg: Config):
    if REQUIRED_LOGGER not in cfg.trainer.loggers:
        yield (f"trainer.loggers must include {REQUIRED_LOGGER!r}, got {list(cfg.trainer.loggers)}: "
               f"summary.json, the curves and trainer.resume read OUTPUT_DIR/metrics.jsonl; add the "
               f"others next to it (valid loggers: {', '.join(RUN_LOGGERS)})")


def _stage_rules(cfg: Config):
    """The SFT and reward-model stages give every rank a share of each mini-batch (rows / pairs)."""
    sft, rm = cfg.trainer.sft, cfg.trainer.rm
    if sft.steps and sft.batch_size < cfg.actor.num_ranks:
        yield (f"trainer.sft.batch_size={sft.batch_size} must be at least actor.num_ranks={cfg.actor.num_ranks} "
               f"(every rank trains a share of the SFT mini-batch)")
    if rm.steps and not cfg.reward.model_path:
        yield "trainer.rm.steps > 0 trains the reward model at reward.model_path: set it"
    if rm.steps and rm.batch_size < cfg.reward.num_ranks:
        yield (f"trainer.rm.batch_size={rm.batch_size} must be at least reward.num_ranks={cfg.reward.num_ranks} "
               f"(every rank trains a share of the pairs)")


def _roles_in_use(cfg: Config) -> list[str]:
    roles = list(cfg.trainable_roles)
    roles += ["reference"] if cfg.needs_reference else []
    return roles + (["reward"] if cfg.uses_reward_model else [])


def _evaluation_rules(cfg: Config):
    """The SFT stage scores held-out answers with reward.functions and reward.remote (exact_match when
    there are neither)."""
    yield from _correct_score_rules(cfg.reward)
    yield from _remote_rules(cfg)


# The rules each command's config must pass: `rlhf-ds train` (and everything that plans or benchmarks an RL
# run) all of them; the SFT and reward-model stages train one role on their own batches, so the RL batch,
# loss and launcher rules (which concern the RL roles) do not bind them.
_RULES = {
    "rl": (_batch_rules, _estimator_rules, _loss_rules, _kl_rules, _reward_rules, _remote_rules, _runtime_rules,
           _launcher_rules, _in_actor_rules, _vllm_placement_rules, _logging_rules, _stage_rules),
    "sft": (_evaluation_rules, _runtime_rules, _in_actor_rules, _vllm_placement_rules, _logging_rules, _stage_rules),
    "rm": (_runtime_rules, _logging_rules, _stage_rules),
}


def validate(cfg: Config, stage: Stage = "rl") -> None:
    """Check every cross-field rule of ``stage`` (rl | sft | rm); raise one ConfigError listing all that fail."""
    if stage not in _RULES:
        raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(_RULES)}")
    problems = [message for rule in _RULES[stage] for message in rule(cfg)]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
