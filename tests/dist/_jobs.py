"""Functions run on every rank of a spawned gloo group (see _launch.run_ranks). Each builds its engines
once and runs many cases; results are plain tensors / floats, returned from rank 0 unless noted."""
from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_grad

import _reference as ref
from rlhf_ds.algo import token_weights
from rlhf_ds.batch import Experience
from rlhf_ds.config import load_config
from rlhf_ds.engine import dist
from rlhf_ds.engine.build import build_engine
from rlhf_ds.engine.step import accumulate_gradients, discard_gradients
from rlhf_ds.workers.actor import actor_loss
from rlhf_ds.workers.critic import critic_loss


def make_config(model_dir: str, output_dir: str, value_dir: str = "", lr: float = 1e-3, extra=()):
    world = dist.dp_size()
    overrides = [f"actor.model_path={model_dir}", f"reference.model_path={model_dir}",
                 f"actor.num_ranks={world}", "actor.micro_batch_size=2", "algo.mini_batch_size=8",
                 "data.prompts_per_step=4", "rollout.n=2", f"actor.lr={lr}", "actor.weight_decay=0.01",
                 "algo.kl_placement=loss", f"algo.kl_coef={ref.KL_COEF}", "algo.kl_estimator=k3",
                 f"algo.entropy_coef={ref.ENTROPY_COEF}", f"algo.clip_low={ref.CLIP_LOW}",
                 f"algo.clip_high={ref.CLIP_HIGH}", f"algo.dual_clip={ref.DUAL_CLIP}",
                 f"algo.value_clip={ref.VALUE_CLIP}", f"algo.value_loss_coef={ref.VALUE_COEF}",
                 "rollout.temperature=1.0", f"trainer.output_dir={output_dir}", "trainer.max_steps=10",
                 *extra]
    if value_dir:
        overrides += [f"critic.model_path={value_dir}", f"critic.num_ranks={world}", "critic.micro_batch_size=2",
                      f"critic.lr={lr}"]
    return load_config(None, overrides)


def my_shard(exp: Experience) -> Experience:
    size = len(exp) // dist.dp_size()
    return exp.select(slice(dist.dp_rank() * size, (dist.dp_rank() + 1) * size))


def with_mode(exp: Experience, mode: str, micro: int) -> Experience:
    """The whole mini-batch with the token weights of ``mode`` (as the trainer sets them)."""
    return exp.replace(token_weights=token_weights(exp.response_mask, mode, group_ids=exp.group_ids,
                                                   micro_batch_size=micro, loss_norm_len=ref.MAX_SEQ_LEN))


def params_of(worker) -> dict[str, torch.Tensor]:
    """Full parameters of a worker's engine (collective)."""
    return {name: tensor for bucket in worker.weight_buckets() for name, tensor in bucket}


def full_grads(module) -> dict[str, torch.Tensor]:
    return {n: safe_get_full_grad(p).detach().clone().cpu() for n, p in module.named_parameters()}


def grads_of(role_engine, loss_fn, exp: Experience, micro: int, dp_scale: bool = True) -> dict:
    """Accumulate one mini-batch (our semantics, or DeepSpeed's default for the negative control),
    read the full gradients, then drop them so the next case starts from the same parameters."""
    engine, pieces = role_engine.engine, my_shard(exp).chunk(micro)
    if dp_scale:
        accumulate_gradients(engine, pieces, loss_fn)
    else:
        for index, piece in enumerate(pieces):
            engine.set_gradient_accumulation_boundary(index == len(pieces) - 1)
            engine.backward(loss_fn(piece)[0])          # default: / accumulation steps, ranks averaged
    grads = full_grads(role_engine.module)
    discard_gradients(engine)
    return grads


def gradient_job(model_dir: str, value_dir: str, out_dir: str, actor_exp: Experience, critic_exp: Experience,
                 modes: list, micros: list, extra: tuple = ()) -> dict:
    cfg = make_config(model_dir, out_dir, value_dir, extra=extra)
    device = dist.get_device()
    actor, critic = build_engine(cfg, "actor"), build_engine(cfg, "critic")
    actor_fn = lambda mb: actor_loss(actor.engine, mb, cfg.algo, kl_coef=ref.KL_COEF, temperature=1.0,  # noqa: E731
                                     device=device)
    critic_fn = lambda mb: critic_loss(critic.engine, mb, cfg.algo, device=device)  # noqa: E731
    results = {}
    for mode in modes:
        for micro in micros:
            results[("actor", mode, micro)] = grads_of(actor, actor_fn, with_mode(actor_exp, mode, micro), micro)
    results[("actor_ds_default", "token_mean", 2)] = grads_of(
        actor, actor_fn, with_mode(actor_exp, "token_mean", 2), 2, dp_scale=False)
    for micro in micros:
        results[("critic", "token_mean", micro)] = grads_of(
            critic, critic_fn, with_mode(critic_exp, "token_mean", micro), micro)
    results["layout"] = {role: zero3_layout(engine.module) for role, engine in (("actor", actor), ("critic", critic))}
    return results if dist.dp_rank() == 0 else {}


def gradient_cases_job(model_dir: str, value_dir: str, out_dir: str, actor_exp: Experience, critic_exp: Experience,
                       cases: dict) -> dict:
    """``gradient_job`` for each case (name -> (modes, micros, config overrides)), in these processes: the
    ranks start once for all of them."""
    return {name: gradient_job(model_dir, value_dir, f"{out_dir}/{name}", actor_exp, critic_exp, modes, micros, extra)
            for name, (modes, micros, extra) in cases.items()}


def zero3_layout(module) -> dict:
    """Which modules ZeRO-3 hooks as one unit, and how many parameters it partitions (not persistent)."""
    from deepspeed.utils import get_z3_leaf_modules
    return {"leaf classes": sorted({type(m).__name__ for m in get_z3_leaf_modules(module)}),
            "partitioned": sum(not getattr(p, "ds_persist", False) for p in module.parameters()),
            "parameters": sum(1 for _ in module.parameters())}


def optimizer_snapshot(engine) -> list:
    """This rank's fp32 master partitions and their Adam state (exp_avg, exp_avg_sq, step)."""
    opt = engine.optimizer
    snap = []
    for flat in opt.fp32_partitioned_groups_flat:
        state = opt.optimizer.state.get(flat, {})
        snap.append((flat.detach().clone(), {k: torch.as_tensor(v).clone() for k, v in state.items()}))
    return snap


def same_snapshot(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for (pa, sa), (pb, sb) in zip(a, b):
        if not torch.equal(pa, pb) or set(sa) != set(sb):
            return False
        if not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def all_ranks_true(flag: bool) -> bool:
    return not dist.any_rank(not flag)


def same_params(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def state_job(model_dir: str, out_dir: str, exp1: Experience, exp2: Experience) -> dict:
    """Skip on NaN, checkpoint round trip, resume equivalence and export, on one set of engines."""
    from rlhf_ds.workers.actor import ActorWorker

    cfg = make_config(model_dir, out_dir, lr=1e-2)
    rank, world = dist.dp_rank(), dist.dp_size()
    exp1, exp2 = with_mode(exp1, "token_mean", 2), with_mode(exp2, "token_mean", 2)
    out = {}
    first = ActorWorker(cfg)
    first.init_model()
    params0, opt0 = params_of(first), optimizer_snapshot(first.engine)
    poisoned = my_shard(exp1)
    if rank == world - 1:  # NaN on one rank only
        advantages = poisoned.advantages.clone()
        advantages[1, 0] = float("nan")  # a real token of row 1
        poisoned = poisoned.replace(advantages=advantages)
    out["skip_metrics"] = first.train_minibatch(poisoned)
    out["unchanged_after_skip"] = all_ranks_true(same_params(params_of(first), params0)
                                                 and same_snapshot(optimizer_snapshot(first.engine), opt0))
    out["step1_metrics"] = first.train_minibatch(my_shard(exp1))
    params1 = params_of(first)
    out["changed_after_step"] = not same_params(params1, params0)

    # An uninterrupted engine that never saw the skipped step lands on the same parameters.
    clean = ActorWorker(cfg)
    clean.init_model()
    clean.train_minibatch(my_shard(exp1))
    out["skip_left_no_trace"] = all_ranks_true(same_params(params_of(clean), params1))

    ckpt = f"{out_dir}/ckpt"
    first.save_checkpoint(ckpt, {"rl_step": 7})
    opt1 = optimizer_snapshot(first.engine)
    first.train_minibatch(my_shard(exp2))
    params2 = params_of(first)
    first.export_hf(f"{out_dir}/export")
    with torch.no_grad():
        on_device = exp2.to(dist.get_device())
        out["logits"] = first.engine(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask,
                                     position_ids=on_device.position_ids).logits.cpu()

    resumed = ActorWorker(cfg)
    resumed.init_model()
    out["client_state"] = {k: v for k, v in resumed.load_checkpoint(ckpt).items() if k == "rl_step"}
    out["params_restored"] = all_ranks_true(same_params(params_of(resumed), params1))
    out["optimizer_restored"] = all_ranks_true(same_snapshot(optimizer_snapshot(resumed.engine), opt1))
    resumed.train_minibatch(my_shard(exp2))
    out["resumed_step_matches"] = all_ranks_true(same_params(params_of(resumed), params2))
    out["params2"] = params2
    return out if rank == 0 else {}


def forward_job(model_dir: str, value_dir: str, out_dir: str, exp: Experience) -> dict:
    """Every role's micro-batched forward on the full batch (each rank computes all rows)."""
    from rlhf_ds.workers.actor import ActorWorker
    from rlhf_ds.workers.critic import CriticWorker
    from rlhf_ds.workers.reference import ReferenceWorker
    from rlhf_ds.workers.reward_model import RewardModelWorker

    cfg = make_config(model_dir, out_dir, value_dir,
                      extra=[f"reward.model_path={value_dir}", "reward.use_model=true", "reward.micro_batch_size=3",
                             "reference.micro_batch_size=3", "rollout.temperature=0.7"])
    out = {}
    for name, cls in (("actor", ActorWorker), ("critic", CriticWorker), ("reference", ReferenceWorker),
                      ("reward", RewardModelWorker)):
        worker = cls(cfg)
        worker.init_model()
        if name == "actor":
            out["actor"] = worker.compute_logprobs(exp)
        elif name == "critic":
            out["critic"] = worker.compute_values(exp)
        elif name == "reference":
            out["reference"] = worker.compute_logprobs(exp)
        else:
            out["reward"] = worker.compute_scores(exp)
    # Engines live on in this process; a plain HF load after them (the SPMD rollout engine, a tiny model
    # built on first use) must still give whole, unpartitioned parameters.
    from transformers import AutoModelForCausalLM
    out["plain_load"] = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}
    return out


def held_model_states(engine) -> dict:
    """Bytes this rank's ZeRO-3 engine holds: its parameter partitions, and its optimizer states (the fp32
    master partitions and every Adam moment tensor the optimizer keeps for them)."""
    params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters())
    opt = engine.optimizer
    masters = opt.fp32_partitioned_groups_flat
    moments = [v for flat in masters for v in opt.optimizer.state.get(flat, {}).values()
               if torch.is_tensor(v) and v.numel() > 1]
    optimizer = sum(t.numel() * t.element_size() for t in masters + moments)
    return {"parameters": params, "optimizer states": optimizer, "moment tensors": len(moments),
            "master tensors": len(masters), "optimizer": type(opt.optimizer).__name__}


def plan_job(model_dir: str, value_dir: str, out_dir: str, actor_exp: Experience, critic_exp: Experience,
             templates: list) -> dict:
    """Actor and critic engines built by their workers, one optimizer step each (Adam allocates its
    moments at the first step), then what each rank holds, per ds_config template."""
    from rlhf_ds.workers.actor import ActorWorker
    from rlhf_ds.workers.critic import CriticWorker

    out = {}
    for template in templates:
        cfg = make_config(model_dir, f"{out_dir}/{dist.dp_size()}", value_dir,
                          extra=[f"actor.ds_config={template}", f"critic.ds_config={template}"])
        for name, cls, exp in (("actor", ActorWorker, actor_exp), ("critic", CriticWorker, critic_exp)):
            worker = cls(cfg)
            worker.init_model()
            worker.train_minibatch(my_shard(with_mode(exp, "token_mean", 2)))
            out[(template, name)] = held_model_states(worker.engine)
    return out
