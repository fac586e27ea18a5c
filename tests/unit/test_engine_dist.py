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
