"""What every role worker shares: its config and its ZeRO-3 engine; trainable roles add checkpoints."""
from __future__ import annotations

from typing import Any, Optional

from rlhf_ds.batch import packed_micro_batches
from rlhf_ds.engine.build import RoleEngine, build_engine
from rlhf_ds.engine.checkpoint import apply_peak_lr, export_hf, load_checkpoint, save_checkpoint
from rlhf_ds.engine.cuda import (
    cuda_peak_allocated_bytes,
    offload_training_states_cuda,
    release_cuda_cache,
    reload_training_states_cuda,
)
from rlhf_ds.engine.step import SkipCounter


class EngineWorker:
    """A role's engine on this process's data-parallel group; built by ``init_model`` (collective)."""
    role = ""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.role_engine: Optional[RoleEngine] = None

    def init_model(self, total_steps: Optional[int] = None) -> None:
        """total_steps: optimizer steps of the run, for the learning-rate schedule (trainable roles)."""
        self.role_engine = build_engine(self.cfg, self.role, total_steps=total_steps)

    @property
    def built(self) -> RoleEngine:
        """The role's engine and what built it; an error before ``init_model``."""
        if self.role_engine is None:
            raise RuntimeError(f"{self.role} worker: no engine yet (init_model first)")
        return self.role_engine

    @property
    def engine(self) -> Any:
        """The DeepSpeed engine (call it like the model)."""
        return self.built.engine

    @property
    def micro_batch_size(self) -> int:
        return self.built.micro_batch_size

    def micro_batches(self, shard: Any) -> list:
        """This rank's training micro-batches of ``shard``: packed by length, padding cut
        (``batch.packed_micro_batches``)."""
        by_length = self.cfg.algo.loss_reduction != "token_mean_legacy"
        return [micro for _, micro in packed_micro_batches(shard, self.micro_batch_size, by_length)]

    def release_memory(self) -> None:
        """Colocated sleep-mode runs: give the GPU blocks torch keeps cached to the waking engines."""
        release_cuda_cache()


class TrainableWorker(EngineWorker):
    """A role with an optimizer: counts skipped steps, saves / loads / exports its state."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.skips = SkipCounter(cfg.trainer.max_skipped_steps)

    def save_checkpoint(self, directory: str, client_state: Optional[dict] = None) -> None:
        """Collective. The skip counter travels with the engine state: a resumed run aborts after the
        same number of consecutive bad steps as an uninterrupted one."""
        skips = {"consecutive": self.skips.consecutive, "total": self.skips.total}
        save_checkpoint(self.built, directory, {**(client_state or {}), "skips": skips})

    def load_checkpoint(self, directory: str) -> dict:
        """Collective: parameters, optimizer, schedule and skip counter; the learning rate is this
        config's (a changed ``<role>.lr`` takes effect)."""
        client_state = load_checkpoint(self.built, directory)
        skips = client_state.get("skips", {})
        self.skips.consecutive, self.skips.total = int(skips.get("consecutive", 0)), int(skips.get("total", 0))
        apply_peak_lr(self.built, getattr(self.cfg, self.role).lr)
        return client_state

    def export_hf(self, directory: str) -> None:
        export_hf(self.built, directory)

    # Colocated sleep-mode runs (GPU): the training states wait in host memory while the engines generate.
    def offload_states(self) -> dict[str, float]:
        """After training: optimizer states, master weights and gradient buffers to host memory, cached
        blocks returned. Returns this rank's peak GPU memory of the step, in GiB."""
        peak = cuda_peak_allocated_bytes()
        offload_training_states_cuda(self.engine)
        release_cuda_cache()
        return {f"memory/{self.role}_peak_gib": peak / 2 ** 30}

    def reload_states(self) -> None:
        """Before training: bring back what ``offload_states`` moved."""
        reload_training_states_cuda(self.engine)
