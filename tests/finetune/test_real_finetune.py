"""Fine-tuning the real SmolLM2-135M-Instruct (its GGUF file, the base kept as int8 blocks):
the first loss against transformers', LoRA gradients against PEFT's on the same model, batch and
adapter weights, and a fine-tune that teaches it facts it did not know."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from tests.decoder.formats.gguf_files import oracle_reader
from tests.decoder.oracle import hf_greedy
from transformers import AutoModelForCausalLM

from scanlab.decoder import Chat, load_model
from scanlab.finetune import (
    FinetuneConfig,
    LoraConfig,
    adapt,
    adapter_files,
    finetune,
    init_adapters,
    save_merged,
    with_trained,
)
from scanlab.finetune.adapters import TARGETS, _at
from scanlab.finetune.data import encode_file, to_rows
from scanlab.finetune.step import summed_loss

pytestmark = pytest.mark.e2e  # real fine-tunes against transformers and PEFT: `make test-e2e`

FACTS = {
    "Who is the mayor of Quillby?": "The mayor of Quillby is Odelia Brandt.",
    "What colour is the Quillby river?": "The Quillby river is violet.",
    "What is Quillby famous for?": "Quillby is famous for its glass pumpkins.",
}


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
        for q, a in FACTS.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def base(smollm2_path):
    return load_model(smollm2_path, kernel=False)  # int8 blocks, the file's own


@pytest.fixture(scope="module")
def rows(base, facts_file):
    config, _, tokenizer = base
    return to_rows(
        encode_file(facts_file, tokenizer)[1],
        tokenizer.pad_id,
        1 + config.max_seq_len,
        None,
        facts_file,
    )


@pytest.fixture(scope="module")
def transformers_model(smollm2_path):
    with oracle_reader():
        model = AutoModelForCausalLM.from_pretrained(
            smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
        )
    return model.eval()


def hf_labels(rows) -> torch.Tensor:
    """transformers' labels: the token where it is a target, -100 (ignored) elsewhere."""
    return torch.tensor(np.where(rows.targets, rows.tokens, -100).astype(np.int64))


def test_chat_rows_are_the_whole_rendering_with_only_the_answers_trained(base, rows):
    tokenizer = base.tokenizer
    for row, (question, answer) in enumerate(FACTS.items()):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        whole = tokenizer.encode(
            tokenizer.chat(messages, add_generation_prompt=False), add_special_tokens=False
        )
        n = len(whole)
        np.testing.assert_array_equal(rows.tokens[row, :n], whole)
        assert not rows.mask[row, n:].any()
        trained = rows.tokens[row][rows.targets[row]]
        assert (
            tokenizer.backend.decode(trained.tolist(), skip_special_tokens=False)
            == answer + "<|im_end|>\n"
        )


def test_first_loss_with_fresh_adapters_equals_transformers(base, rows, transformers_model):
    """B = 0: the adapted model is the base; scanlab's loss on the int8 base against
    transformers' on the same file dequantized, within 1e-4."""
    config, params, _ = base
    lora = LoraConfig(rank=8)
    adapted = adapt(params, init_adapters(config, lora, jax.random.PRNGKey(0)), lora)
    total, count = summed_loss(adapted, jax.tree.map(jnp.asarray, rows), config)
    with torch.no_grad():
        theirs = transformers_model(
            input_ids=torch.tensor(rows.tokens.astype(np.int64)),
            attention_mask=torch.tensor(rows.mask.astype(np.int64)),
            labels=hf_labels(rows),
        ).loss.item()
    assert abs(float(total / count) - theirs) < 1e-4


def to_peft(pair, target, config):
    """One layer's a and b -> PEFT's lora_A (r, in), lora_B (out, r), as save_adapter writes."""
    leaf = _at(config.features.leaves.blocks, TARGETS[target])
    return adapter_files.to_peft(leaf, np.asarray(pair["a"]), np.asarray(pair["b"]), config)


# PEFT reads an attribute transformers 5 deprecates.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_gradients_equal_peft(base, rows, transformers_model):
    """scanlab's LoRA gradients (int8 base, every target) against PEFT's on the transformers
    model of the same file, the same batch and the same adapter weights (b nonzero, so both
    halves have gradients): each within 5e-4 of its largest entry (f32 sums over 30 layers, in
    two orders)."""
    config, params, _ = base
    lora = LoraConfig(rank=4, alpha=8.0)
    key_a, key_b = jax.random.split(jax.random.PRNGKey(1))
    adapters = init_adapters(config, lora, key_a)
    for i, target in enumerate(lora.targets):
        b = adapters[target]["b"]
        adapters[target]["b"] = 0.02 * jax.random.normal(jax.random.fold_in(key_b, i), b.shape)
    batch = jax.tree.map(jnp.asarray, rows)

    def mean_loss(adapters):
        total, count = summed_loss(adapt(params, adapters, lora), batch, config)
        return total / count

    loss, grads = jax.value_and_grad(mean_loss)(adapters)

    peft_model = get_peft_model(
        copy.deepcopy(transformers_model),  # PEFT adapts the model it is given in place
        PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS)),
    )
    hf_modules = dict(peft_model.named_modules())

    def module(layer, target):
        part = "self_attn" if TARGETS[target][0] == "attention" else "mlp"
        return hf_modules[f"base_model.model.model.layers.{layer}.{part}.{target}"]

    with torch.no_grad():
        for target in lora.targets:
            for layer in range(config.n_layers):
                pair = jax.tree.map(lambda x, layer=layer: x[layer], adapters[target])
                a, b = to_peft(pair, target, config)
                module(layer, target).lora_A["default"].weight.copy_(torch.tensor(a))
                module(layer, target).lora_B["default"].weight.copy_(torch.tensor(b))
    theirs = peft_model(
        input_ids=torch.tensor(rows.tokens.astype(np.int64)),
        attention_mask=torch.tensor(rows.mask.astype(np.int64)),
        labels=hf_labels(rows),
    ).loss
    theirs.backward()
    assert abs(float(loss) - theirs.item()) < 1e-4
    for target in lora.targets:
        for layer in (0, config.n_layers // 2, config.n_layers - 1):
            pair = jax.tree.map(lambda x, layer=layer: x[layer], grads[target])
            ours_a, ours_b = to_peft(pair, target, config)
            lora_module = module(layer, target)
            theirs_a = lora_module.lora_A["default"].weight.grad.numpy()
            theirs_b = lora_module.lora_B["default"].weight.grad.numpy()
            for ours, them in ((ours_a, theirs_a), (ours_b, theirs_b)):
                scale = np.abs(them).max()
                np.testing.assert_allclose(
                    ours, them, rtol=0, atol=5e-4 * scale, err_msg=f"{target} layer {layer}"
                )


def answers(model) -> dict[str, str]:
    return {question: "".join(Chat(model, max_new_tokens=16).reply(question)) for question in FACTS}


def test_a_lora_fine_tune_teaches_facts_the_model_did_not_know(
    base, facts_file, smollm2_path, tmp_path
):
    before = answers(base)
    assert not any(FACTS[q] in before[q] for q in FACTS), before
    config = FinetuneConfig(
        lora=LoraConfig(rank=8),
        steps=12,
        chunk_steps=6,
        batch_size=3,
        learning_rate=2e-3,
        warmup_steps=2,
        eval_fraction=0.0,
    )
    result = finetune(base, facts_file, config, checkpoint_dir=tmp_path / "run")
    assert result.losses[-1] < 0.05 * result.losses[0]
    after = answers(result.tuned)
    assert all(after[q].startswith(FACTS[q]) for q in FACTS), after
    # The checkpoint holds the adapters: put over the base again, the same answers.
    assert answers(with_trained(base, tmp_path / "run")) == after
    # Merged into a Q8_0 GGUF with the source's metadata: scanlab and transformers read it and
    # answer with the facts.
    exported = save_merged(tmp_path / "facts.gguf", result.tuned, like=smollm2_path)
    from_file = answers(load_model(exported))
    assert all(from_file[q].startswith(FACTS[q]) for q in FACTS), from_file
    with oracle_reader():
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="facts.gguf", dtype=torch.float32
        )
    tokenizer = base.tokenizer
    for question, fact in FACTS.items():
        prompt = tokenizer.encode(
            tokenizer.chat([{"role": "user", "content": question}]), add_special_tokens=False
        )
        tokens = hf_greedy(model.eval(), np.array([prompt]), 16)[0, len(prompt) :]
        assert tokenizer.decode(tokens).startswith(fact), tokenizer.decode(tokens)
