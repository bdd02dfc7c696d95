"""The tiny models and tokenizer the unit tests share (one place for them).

`TINY` is a two-layer decoder whose vocabulary is the tiny tokenizer's; `tiny_tokenizer()`
is a byte-level BPE with ChatML's special tokens and chat template, built in memory from a few
sentences (no file fetched, no network), so fine-tuning's data path runs as on a real chat
model. `TINY_TRAIN` is the one-layer model the training tests run.
"""

import functools
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from scanlab.decoder import DecoderConfig, Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML, as SmolLM2's template writes it: each turn between <|im_start|>ROLE\n and <|im_end|>\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = (
    "What is 1 + 1? 2. Say 3. Scan the layers. The mayor of Quillby is Odelia Brandt. "
    "system user assistant Uno. Dos. Hello, how are you? I am fine, thank you."
)
VOCAB_SIZE = 320  # at least the tokenizer's vocabulary


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE of under VOCAB_SIZE tokens trained on CORPUS, with ChatML's template."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([CORPUS], trainer)
    assert backend.get_vocab_size() <= VOCAB_SIZE
    end_of_text, _, end_of_turn = (backend.token_to_id(token) for token in SPECIAL_TOKENS)
    return Tokenizer(
        backend=backend,
        chat_template=CHAT_TEMPLATE,
        eos_ids=(end_of_text, end_of_turn),
        bos_token="",
        eos_token="<|endoftext|>",
        pad_id=end_of_text,
    )


TINY = DecoderConfig(
    vocab_size=VOCAB_SIZE,
    n_layers=2,
    d_model=64,
    n_heads=2,
    n_kv_heads=1,
    head_dim=32,
    mlp_dim=64,
    max_seq_len=64,
)

# The training tests' model: TrainConfig(**TINY_TRAIN, ...).
TINY_TRAIN = {"n_layers": 1, "d_model": 32, "mlp_dim": 64}


def fast_compile_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with XLA's backend optimization off, for processes that
    run tiny models: compiling their programs is most of their time (the Makefile's
    FAST_COMPILE does the same for the default tier)."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = f"--xla_backend_optimization_level=0 {env.get('XLA_FLAGS', '')}".strip()
    return env
