"""Every choice list of rlhf_ds, declared once.

An enum-like config field is annotated with one of the ``Literal`` aliases below: the config validator,
its error message and ``rlhf-ds config fields`` read the choices from that alias. The tuple next to
each alias holds the same values (read with ``get_args``, not written again) for the code that looks a
value up: the math in ``rlhf_ds.algo`` and the engine in ``rlhf_ds.engine``. No other module spells
out a list of these names; tests/unit/test_choices.py fails if one does.

Subsets that carry a meaning of their own (``GROUP_ESTIMATORS``, ``TOKEN_REWARD_ESTIMATORS``) and the
policy-loss homogeneity table live here too, next to the list they are cut from.

Standard library only: the config (no torch) and the math both import it.
"""
from typing import Literal, get_args

# ----------------------------------------------------------------------------- engines and rollout

Precision = Literal["auto", "fp32", "bf16"]  # auto = bf16 on GPU, fp32 on CPU
PRECISIONS: tuple[str, ...] = get_args(Precision)

LrSchedule = Literal["constant", "linear", "cosine"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)

RolloutBackend = Literal["hf", "vllm"]
ROLLOUT_BACKENDS: tuple[str, ...] = get_args(RolloutBackend)

HfDecoder = Literal["static", "generate"]  # the HF engine's decode loop (rollout/static_decode.py or generate)
HF_DECODERS: tuple[str, ...] = get_args(HfDecoder)

CudagraphMode = Literal["auto", "NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"]
CUDAGRAPH_MODES: tuple[str, ...] = get_args(CudagraphMode)

# ----------------------------------------------------------------------------- advantages

AdvantageEstimator = Literal["grpo", "grpo_no_std", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)

# Estimators that normalise within the samples of one prompt: they need rollout.n >= 2.
GROUP_ESTIMATORS: tuple[AdvantageEstimator, ...] = ("grpo", "grpo_no_std", "rloo", "reinforce_pp_baseline")
# Estimators built on per-token rewards: only they can take the KL penalty inside the reward. The
# others give every token of a response its sequence's advantage.
TOKEN_REWARD_ESTIMATORS: tuple[AdvantageEstimator, ...] = ("reinforce_pp", "reinforce_pp_baseline", "gae")

# ----------------------------------------------------------------------------- losses

LossReduction = Literal["token_mean", "token_mean_legacy", "sequence_mean", "seq_mean_token_sum_norm",
                        "prompt_mean"]
LOSS_REDUCTIONS: tuple[LossReduction, ...] = get_args(LossReduction)
# Reductions done by pre-scaling the advantage (rlhf_ds/algo/reduction.py): every mode is, so a policy
# loss that is not homogeneous in the advantage would be mis-scaled by any of them.
PRESCALED_REDUCTIONS: tuple[LossReduction, ...] = LOSS_REDUCTIONS

# Policy losses and whether each is positively homogeneous in the advantage (loss(c*A) = c*loss(A) for
# c > 0), which advantage pre-scaling needs. The keys are the one list of valid `algo.policy_loss`
# names; rlhf_ds/algo/losses.py maps each to its function.
PolicyLoss = Literal["ppo", "gspo"]
POLICY_LOSS_NAMES: tuple[PolicyLoss, ...] = get_args(PolicyLoss)
POLICY_LOSS_HOMOGENEOUS: dict[PolicyLoss, bool] = {"ppo": True, "gspo": True}
if set(POLICY_LOSS_HOMOGENEOUS) != set(POLICY_LOSS_NAMES):
    raise RuntimeError("every policy loss must say whether it is homogeneous in the advantage")

KlEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KlEstimator)

KlPlacement = Literal["none", "loss", "reward"]
KL_PLACEMENTS: tuple[str, ...] = get_args(KlPlacement)

# What a NaN / inf reward-model score does: stop the run, or score the sample reward.failure_value.
# The built-in rule reward functions (rlhf_ds/rewards/functions.py registers one for each); each pays 0 or 1.
BuiltinReward = Literal["exact_match", "format", "final_number", "code_tests"]
BUILTIN_REWARDS: tuple[BuiltinReward, ...] = get_args(BuiltinReward)

NonfiniteScorePolicy = Literal["fail", "failure_value"]
NONFINITE_SCORE_POLICIES: tuple[str, ...] = get_args(NonfiniteScorePolicy)

# ----------------------------------------------------------------------------- cluster

Launcher = Literal["ray", "deepspeed"]
LAUNCHERS: tuple[str, ...] = get_args(Launcher)

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
PLACEMENT_STRATEGIES: tuple[str, ...] = get_args(PlacementStrategy)

# Model roles (config sections with a model engine). Not a config field: the names are section names.
TRAINABLE_ROLES = ("actor", "critic")     # take optimizer steps
INFERENCE_ROLES = ("reference", "reward")  # forward only, no optimizer
ROLES = TRAINABLE_ROLES + INFERENCE_ROLES

# ----------------------------------------------------------------------------- logging

# Where each step's metrics go (trainer.loggers). jsonl is required: summary.json, the curves and
# trainer.resume read OUTPUT_DIR/metrics.jsonl.
RunLoggerName = Literal["jsonl", "tensorboard", "wandb"]
RUN_LOGGERS: tuple[str, ...] = get_args(RunLoggerName)
REQUIRED_LOGGER: RunLoggerName = "jsonl"
DEFAULT_LOGGERS: tuple[RunLoggerName, ...] = ("jsonl", "tensorboard")

# wandb.init(mode=...): offline writes the run under the output dir and never needs the network.
WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)

# ----------------------------------------------------------------------------- stages

# What a command runs: the RL loop (`rlhf-ds train`), or one training stage alone (`rlhf-ds sft`, `rlhf-ds rm`).
# Each validates its config by its own rules and plans only the processes it starts.
Stage = Literal["rl", "sft", "rm"]
STAGES: tuple[str, ...] = get_args(Stage)
