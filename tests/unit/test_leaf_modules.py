"""`<role>.zero3_leaf_modules`: which modules ZeRO-3 gathers and hooks as one unit. 'auto' finds the
transformer blocks of Llama, Qwen2 and the value model; names are checked against the model before any
engine is built; the planner's gather unit follows the setting (by hand). That the engines compute exact
gradients with either setting, with every parameter gathered: tests/dist/test_sum_gradients.py."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ds.config import load_config
from rlhf_ds.models.blocks import largest_unit_numel, leaf_module_classes, transformer_block_classes
from rlhf_ds.models.files import ModelCheckError
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.models.value_model import ValueModel
from rlhf_ds.plan.shapes import ShapeError, model_shape
from rlhf_ds.trainer.run import check_role_models

TINY = "tiny:llama-arith"


def tiny_lm() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY))


def test_auto_is_the_decoder_layer_of_llama_qwen2_and_the_value_model():
    assert leaf_module_classes(tiny_lm(), "auto", "actor.zero3_leaf_modules", TINY) == ("LlamaDecoderLayer",)
    value = ValueModel.from_pretrained(resolve_model_path("tiny:llama-arith-value"))
    assert transformer_block_classes(value) == ("LlamaDecoderLayer",)
    qwen = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:qwen2-arith"))
    assert leaf_module_classes(qwen, " auto ", "critic.zero3_leaf_modules", "q") == ("Qwen2DecoderLayer",)


def test_none_and_named_classes():
    model = tiny_lm()
    assert leaf_module_classes(model, "none", "actor.zero3_leaf_modules", TINY) == ()
    assert leaf_module_classes(model, "LlamaMLP, LlamaAttention", "f", TINY) == ("LlamaMLP", "LlamaAttention")


@pytest.mark.parametrize("spec", ["LlamaMLP,Qwen2MLP", "ModuleList", ",", ""])
def test_a_class_the_model_lacks_is_refused_naming_the_field_the_model_and_the_choices(spec):
    with pytest.raises(ValueError) as err:
        leaf_module_classes(tiny_lm(), spec, "reference.zero3_leaf_modules", "/models/x")
    message = str(err.value)
    assert message.startswith(f"reference.zero3_leaf_modules={spec!r}: /models/x has no module of class")
    assert "valid: 'auto', 'none', or class names separated by commas" in message
    assert "LlamaDecoderLayer" in message and "LlamaRotaryEmbedding" not in message   # classes with parameters
    assert "ModuleList" not in message.split("among")[1]        # a container never runs a forward
    if spec and spec != ",":
        assert f"of class {spec.split(',')[-1]};" in message


def test_the_gather_unit_is_a_whole_block_under_auto_by_hand():
    h, i, layers = 64, 256, 2                          # tiny:llama-arith, 4 heads of 16, no biases
    block = 4 * h * h + 3 * h * i + 2 * h              # q, k, v, o; gate, up, down; two RMSNorms
    assert model_shape(TINY).largest_module_numel == h * i                       # one MLP projection
    assert model_shape(TINY, leaf_modules="auto").largest_module_numel == block
    assert largest_unit_numel(tiny_lm(), ("LlamaDecoderLayer",)) == block
    assert model_shape(TINY, leaf_modules="LlamaMLP").largest_module_numel == 3 * h * i
    assert layers * block < model_shape(TINY).num_params


def test_the_planner_counts_a_whole_block_gathered_at_once():
    from rlhf_ds.plan.memory import ZeroSettings, gathered_parameter_bytes
    zero = ZeroSettings(persistence_threshold=0, prefetch_bucket=0)
    per_module = gathered_parameter_bytes(model_shape(TINY), 4, zero)
    per_block = gathered_parameter_bytes(model_shape(TINY, leaf_modules="auto"), 4, zero)
    assert (per_module, per_block) == (4 * 64 * 256, 4 * (4 * 64 * 64 + 3 * 64 * 256 + 2 * 64))


def test_a_run_naming_a_missing_class_stops_before_any_engine_is_built():
    cfg = load_config("ppo_tiny", [
                                    "critic.zero3_leaf_modules=LlamaDecoderLayer,MixtralSparseMoeBlock"])
    with pytest.raises(ModelCheckError, match=r"critic.zero3_leaf_modules=.*has no module of class "
                                              r"MixtralSparseMoeBlock"):
        check_role_models(cfg, tokenizer_size=10)
    check_role_models(load_config("grpo_tiny", ["actor.zero3_leaf_modules=LlamaMLP"]), tokenizer_size=10)
    with pytest.raises(ShapeError, match="actor.zero3_leaf_modules='Foo'"):
        model_shape(TINY, leaf_modules="Foo", field="actor.zero3_leaf_modules")
