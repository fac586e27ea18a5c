"""Device / environment preparation of the engine layer."""
import os

from rlhf_ds.engine import dist


def test_arch_suffixes_are_stripped_for_deepspeed_jit(monkeypatch):
    # DeepSpeed 0.19's op builder parses every arch as int(major).int(minor) and crashes on "9.0a".
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;10.0f+PTX")
    dist._prepare_accelerator_env()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0+PTX"


def test_cpu_machine_selects_deepspeed_cpu_accelerator(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(dist, "has_gpu", lambda: False)
    dist._prepare_accelerator_env()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert dist.backend_name() == "gloo" and str(dist.get_device()) == "cpu"


FAULTS_PER_CYCLE = r"""
import resource, sys, torch
from rlhf_ds.engine import dist
if sys.argv[1] == "keep":
    assert dist.keep_freed_memory()
def cycle():
    buf = torch.empty(16 * 2 ** 20)       # 64 MiB, as ZeRO-3's per-step buckets and partitions come and go
    buf.fill_(1.0)
    del buf
for _ in range(20):                      # glibc settles on reusing the freed block within a few cycles
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def test_freed_buffers_are_reused_without_page_faults_once_kept():
    """glibc's default maps each large block afresh and unmaps it on free, so every step faults its pages
    in again (64 MiB = 16,384 pages); after keep_freed_memory the freed block is reused."""
    import subprocess
    import sys

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_CYCLE, mode], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return int(out.stdout.strip().splitlines()[-1])

    assert faults("default") > 10_000
    assert faults("keep") < 100
