"""The real SmolLM2 served: eight concurrent greedy chats, each token for token what its prompt
decodes alone; and the README's `scanlab serve` + `curl` lines run as written (on a free port)."""

import re
import shutil
import subprocess
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tests.serve import processes

from scanlab import distributed
from scanlab.decoder import generate, load_model
from scanlab.decoder.chat import PROMPT_BUCKET, left_padded
from scanlab.serve import Engine

pytestmark = pytest.mark.e2e  # the real model served: `make test-e2e`

README = Path(__file__).parents[2] / "README.md"
QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "Who wrote Hamlet?",
    "What is the boiling point of water?",
    "Say hello in Spanish.",
    "What is a prime number?",
]
ANSWER_TOKENS = 24


def test_eight_concurrent_chats_decode_as_each_alone(smollm2_path):
    model = load_model(smollm2_path)
    tokenizer = model.tokenizer
    prompts = [
        tokenizer.encode(tokenizer.chat([{"role": "user", "content": q}]), add_special_tokens=False)
        for q in QUESTIONS
    ]
    engine = Engine(model, slots=8, context=512, steps=4).start()
    answers: dict[int, list[int]] = {}

    def ask(i):
        answers[i] = list(engine.generate(engine.check(prompts[i], ANSWER_TOKENS)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        engine.close()
    for i, prompt in enumerate(prompts):  # alone, as `scanlab chat` pads a prompt
        tokens, mask = left_padded([prompt], tokenizer.pad_id, PROMPT_BUCKET)
        out = generate(
            model.params,
            jnp.asarray(tokens),
            model.config,
            ANSWER_TOKENS,
            attn_mask=jnp.asarray(mask),
            stop_tokens=tokenizer.eos_ids,
            pad_token=tokenizer.pad_id,
        )
        alone = np.asarray(out.tokens[0, tokens.shape[1] :][: int(out.lengths[0])]).tolist()
        assert answers[i] == alone, QUESTIONS[i]
    assert "Paris" in tokenizer.decode(answers[0])


def readme_serving_block() -> tuple[list[str], str]:
    """The README's `scanlab serve` line (its arguments) and its `curl` command."""
    text = README.read_text()
    section = text[text.index("**Many users, one compiled scan.**") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    serve_line, curl = block.split("\n", 1)
    args = serve_line.split("#")[0].strip().rstrip("&").split()
    assert args[:2] == ["scanlab", "serve"], serve_line
    return args[2:], curl


def test_the_readme_serve_and_curl_lines(smollm2_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine: the README's curl line cannot run")
    args, curl = readme_serving_block()
    port = distributed.free_port()
    server, _ = processes.start([*args, "--port", str(port)])
    try:
        command = curl.replace("localhost:8000", f"localhost:{port}")
        answer = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True)
    finally:
        server.terminate()
        server.communicate(timeout=60)
    assert "Paris" in answer.stdout and '"finish_reason"' in answer.stdout
