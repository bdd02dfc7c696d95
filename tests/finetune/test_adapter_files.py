"""LoRA adapters through PEFT's files, both ways: what scanlab saves, `peft.PeftModel` loads over
transformers' model of the same weights and gives scanlab's logits; what PEFT makes and saves,
scanlab loads and gives PEFT's logits. A tiny Llama with grouped-query attention (k/v heads
fewer than q heads), so each projection's inputs and outputs are reordered between layouts."""

import json

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from tests.tiny import TINY, tiny_tokenizer
from transformers import AutoModelForCausalLM

from scanlab.decoder import Model, forward, init_params, quantize, save_checkpoint
from scanlab.errors import ArgumentError, MissingPathError, PathExistsError
from scanlab.finetune import (
    LoraConfig,
    adapt,
    init_adapters,
    load_adapter,
    merged,
    save_adapter,
)

# PEFT reads an attribute transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)
TOKENS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12))
# The same float32 math in torch and XLA: rounding differs, not the numbers.
LOGITS_ATOL = 1e-4
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "o_proj", "down_proj"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """scanlab's tiny model and transformers' model of the same weights."""
    params = init_params(TINY, jax.random.PRNGKey(0))
    directory = tmp_path_factory.mktemp("base") / "tiny"
    save_checkpoint(directory, TINY, params)
    return Model(TINY, params, tiny_tokenizer()), directory


def hf_model(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def trained_adapters(lora: LoraConfig):
    """Adapters as after training: b no longer zero."""
    adapters = init_adapters(TINY, lora, jax.random.PRNGKey(1))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), len(adapters)))
    return {
        target: {"a": pair["a"], "b": 0.1 * jax.random.normal(next(keys), pair["b"].shape)}
        for target, pair in adapters.items()
    }


def test_a_saved_adapter_gives_scanlab_s_logits_in_peft(base, tmp_path):
    model, directory = base
    tuned = model._replace(params=adapt(model.params, trained_adapters(LORA), LORA))
    saved = save_adapter(tmp_path / "adapter", tuned, base_model=str(directory))
    settings = json.loads((saved / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], settings["peft_type"]) == (4, 8.0, "LORA")
    peft_model = PeftModel.from_pretrained(hf_model(directory), saved).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(TOKENS)).logits.numpy()
    ours = np.asarray(forward(tuned.params, TOKENS, TINY))
    assert np.abs(ours - np.asarray(forward(model.params, TOKENS, TINY))).max() > 0.01  # adapted
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_ATOL, rtol=LOGITS_ATOL)
    with pytest.raises(PathExistsError, match="exists and is not empty"):
        save_adapter(saved, tuned)


def test_an_adapter_peft_made_gives_peft_s_logits_in_scanlab(base, tmp_path):
    model, directory = base
    torch.manual_seed(0)
    made = PeftLoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["v_proj", "gate_proj", "up_proj"],
        init_lora_weights=False,  # random lora_B too: an adapter that changes the logits
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(hf_model(directory), made).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        theirs = peft_model(torch.tensor(TOKENS)).logits.numpy()
    loaded = load_adapter(tmp_path / "theirs", model)
    ours = np.asarray(forward(loaded.params, TOKENS, TINY))
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_ATOL, rtol=LOGITS_ATOL)
    # Over int8 blocks (QLoRA-style) it is the adapter over their dequantized twin.
    int8 = model._replace(params=quantize(model.params, TINY))
    twin = int8._replace(params=merged(int8.params))
    np.testing.assert_allclose(
        forward(load_adapter(tmp_path / "theirs", int8).params, TOKENS, TINY),
        forward(load_adapter(tmp_path / "theirs", twin).params, TOKENS, TINY),
        atol=LOGITS_ATOL,
        rtol=LOGITS_ATOL,
    )


def test_a_round_trip_keeps_every_number(base, tmp_path):
    model, _ = base
    tuned = model._replace(params=adapt(model.params, trained_adapters(LORA), LORA))
    again = load_adapter(save_adapter(tmp_path / "adapter", tuned), model)
    np.testing.assert_array_equal(
        forward(again.params, TOKENS, TINY), forward(tuned.params, TOKENS, TINY)
    )


def write_adapter(directory, settings: dict, tensors: dict | None = None):
    from safetensors.numpy import save_file

    directory.mkdir()
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(base | settings))
    save_file(tensors or {}, directory / "adapter_model.safetensors")
    return directory


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"use_dora": True}, "use_dora must be False .* got True"),
        ({"target_modules": ["lm_head"]}, r"target_modules must be among .* got \['lm_head'\]"),
        ({"target_modules": "q_proj|v_proj"}, "target_modules must be a list of names"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save must be None"),
        ({"peft_type": "IA3"}, "peft_type must be 'LORA', got 'IA3'"),
        ({}, "has no tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
    ],
)
def test_what_does_not_fit_is_refused_by_name(base, tmp_path, settings, message):
    model, _ = base
    with pytest.raises(ArgumentError, match=message):
        load_adapter(write_adapter(tmp_path / "adapter", settings), model)


def test_an_adapter_of_another_base_is_refused_naming_the_tensor(base, tmp_path):
    model, _ = base
    name = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    tensors = {}
    for i in range(TINY.n_layers):
        tensors[name.format(i, "A")] = np.zeros((4, 128), np.float32)  # a model 128 wide
        tensors[name.format(i, "B")] = np.zeros((64, 4), np.float32)
    directory = write_adapter(tmp_path / "adapter", {}, tensors)
    with pytest.raises(ArgumentError, match=r"lora_A has shape \(4, 128\), expected \(4, 64\)"):
        load_adapter(directory, model)
    with pytest.raises(MissingPathError, match=r"must hold PEFT's adapter_config\.json"):
        load_adapter(tmp_path, model)
    (directory / "adapter_config.json").write_text("{r: 4")
    with pytest.raises(ArgumentError, match=r"adapter_config\.json is not JSON"):
        load_adapter(directory, model)
