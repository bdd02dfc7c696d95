"""One real-model check per model in `make test`: scanlab's greedy tokens, as users get them
(`load_model`'s default), against the tokens transformers generates on the same file, recorded
in `transformers_tokens.json` so this tier imports no torch.

The recording is the oracle's output, never scanlab's: `make test-e2e` derives it again from
transformers and fails when it differs (`test_the_recording_is_transformers_own`), and the whole
parity suites (`test_real_model.py`, `test_real_gemma3.py`) run there too.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scanlab.decoder import generate, load_model

RECORDED = Path(__file__).with_name("transformers_tokens.json")
NEW_TOKENS = 24
# The fixture that fetches each model, and its prompt: SmolLM2's chat template, Gemma 3 base's
# plain text.
MODELS = {
    "smollm2-135m-instruct": ("smollm2_path", "chat", "What is the capital of France?"),
    "gemma3-270m": ("gemma3_path", "plain", "The capital of France is"),
}


def prompt_ids(tokenizer, kind: str, text: str) -> list[int]:
    """The prompt's ids by scanlab's tokenizer or transformers' (both have these methods)."""
    if kind == "plain":
        return list(tokenizer.encode(text))
    messages = [{"role": "user", "content": text}]
    if hasattr(tokenizer, "apply_chat_template"):  # transformers'
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    else:
        rendered = tokenizer.chat(messages)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_equal_transformers_recorded(name, request):
    fixture, kind, text = MODELS[name]
    config, params, tokenizer = load_model(request.getfixturevalue(fixture))
    recorded = json.loads(RECORDED.read_text())[name]
    ids = prompt_ids(tokenizer, kind, text)
    assert ids == recorded["prompt"]
    ours = generate(params, np.array([ids]), config, NEW_TOKENS).tokens[0, len(ids) :]
    np.testing.assert_array_equal(ours, recorded["greedy"])


def transformers_recording(path: Path, kind: str, text: str) -> dict[str, list[int]]:
    """transformers' prompt ids and greedy tokens (EOS off) on the GGUF file at `path`."""
    import torch
    from tests.decoder.formats.gguf_files import oracle_reader
    from tests.decoder.oracle import hf_greedy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with oracle_reader():
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = prompt_ids(tokenizer, kind, text)
    tokens = hf_greedy(model.eval(), np.array([ids]), NEW_TOKENS)[0, len(ids) :]
    return {"prompt": ids, "greedy": tokens.tolist()}


@pytest.mark.e2e
@pytest.mark.parametrize("name", MODELS)
def test_the_recording_is_transformers_own(name, request):
    fixture, kind, text = MODELS[name]
    derived = transformers_recording(request.getfixturevalue(fixture), kind, text)
    assert json.loads(RECORDED.read_text())[name] == derived, json.dumps(derived)


@pytest.mark.slow
def test_a_long_prompt_prefills_on_the_kernel_without_stalling(gemma3_path):
    """Large enough that XLA runs the kernel's calls on its pool threads, which the kernel's own
    helper tasks share: a call once waited forever there for a helper that could not start. In
    its own process: a stalled call holds the interpreter, so only a timeout can end it."""
    script = f"""
import numpy as np
from scanlab.decoder import generate, load_model
config, params, _ = load_model({str(gemma3_path)!r})
tokens = np.random.default_rng(0).integers(2, 1000, (1, 100))
print(int(generate(params, tokens, config, 1).tokens[0, -1]))
"""
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the 100-token prefill did not end within 120 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert 0 <= int(done.stdout.split()[-1]) < 262144
