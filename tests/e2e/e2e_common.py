"""Shared settings of the e2e runs (a module name of its own: tests/dist has a conftest too)."""
import os

TOY_REWARD = os.path.join(os.path.dirname(__file__), "toy_rewards.py") + ":digit_count"


def tiny_overrides(output_dir) -> list[str]:
    """A micro model, a handful of prompts, no warm start: the machinery, not the learning."""
    return ["actor.model_path=tiny:llama-micro", "trainer.sft.steps=0", "data.prompts_per_step=8",
            "rollout.n=4", "rollout.max_response_len=8", "algo.mini_batch_size=16", "data.num_eval=16",
            "actor.micro_batch_size=4",
            "trainer.eval_interval=0", "actor.lr=1e-3", "trainer.max_steps=2",
            f"reward.functions=[exact_match,{TOY_REWARD}]", f"trainer.output_dir={output_dir}"]
