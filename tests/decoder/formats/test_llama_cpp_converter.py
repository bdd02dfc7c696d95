"""The GGUF a user downloads, made as it is made: llama.cpp's own converter
(`convert_hf_to_gguf.py`, from the llama.cpp sources llama-cpp-python's sdist vendors) turns a
random transformers model of each family into a file, and scanlab reads it as it reads the
transformers directory, with llama.cpp's logits on the same file as a second reference.

Each model carries SmolLM2's tokenizer (the converter needs one it knows by name), hence a
49,152-token vocabulary on a tiny model.
"""

import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
import transformers
from tests.conftest import CACHE
from tests.decoder.formats.test_families import hf_model
from tests.decoder.oracle import hf_greedy

from scanlab.bench import llama_cpp_sources
from scanlab.decoder import (
    forward,
    generate,
    load_checkpoint,
    load_gguf,
    load_model,
    load_tokenizer,
)
from scanlab.decoder.formats.tokenizer import save_tokenizer
from scanlab.finetune import LoraConfig, adapt, init_adapters, save_adapter

pytestmark = pytest.mark.e2e  # builds on llama.cpp's sources and llama-cpp-python: `make test-e2e`

# The converter and what it imports, inside the sdist.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

# The families' tiny models (test_families.py) converted, and the tokenizer.ggml.pre llama.cpp
# is told (None: it names the pre-tokenizer itself). llama.cpp names a pre-tokenizer by hashing a
# known vocabulary's encoding of a test text; transformers encodes with Qwen2's split for a
# qwen2 model, and SmolLM2's vocabulary under Qwen2's split is no vocabulary it knows: it is told.
CONVERTED = {
    "llama3.2": None,
    "llama3-past-its-context": None,  # its converter writes the scaling as rope_freqs.weight
    "qwen2.5": "qwen2",
    "qwen3": None,
    "gemma3-4b-rope": None,
    "smollm3": None,
    "mistral": None,
}

TOKENS = np.random.default_rng(0).integers(0, 49_152, (1, 40))
# Independent float32 implementations of the same math (torch or ggml vs XLA).
LOGITS_ATOL = 1e-4
# ggml's GELU reads a float16 table (GGML_GELU_FP16): Gemma's MLP rounds there.
LLAMA_CPP_ATOL = {"gemma3-4b-rope": 2e-3}
# Q8_0 rounds each weight to 1/254 of its block's largest: what that moves the logits by.
Q8_0_ATOL = 0.1


@pytest.fixture(scope="session")
def converter():
    """llama.cpp's converter, extracted from the hash-checked sdist (fetched once, cached)."""
    return llama_cpp_sources.sources(CONVERTER_PARTS, CACHE / "llama.cpp-converter-0.3.36", CACHE)


def convert(converter, directory, outtype: str, pre: str | None):
    """The GGUF llama.cpp's converter writes for `directory` (told the pre-tokenizer `pre`)."""
    out = directory.with_name(f"{directory.name}-{outtype}.gguf")
    patch = (
        f"conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}"
        if pre
        else ""
    )
    script = textwrap.dedent(f"""
        import runpy, sys
        sys.path[:0] = [{str(converter)!r}, {str(converter / "gguf-py")!r}]
        import conversion.base
        {patch}
        sys.argv = ["convert_hf_to_gguf.py", {str(directory)!r}, "--outtype", {outtype!r},
                    "--outfile", {str(out)!r}]
        runpy.run_path({str(converter / "convert_hf_to_gguf.py")!r}, run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def llama_cpp_logits(path, lora_path=None) -> np.ndarray:
    """llama.cpp's logits of TOKENS on the file (with a LoRA file over it), its K/V cache in f32
    as scanlab's is."""
    from llama_cpp import GGML_TYPE_F32, Llama

    model = Llama(
        str(path),
        lora_path=None if lora_path is None else str(lora_path),
        n_ctx=64,
        n_batch=64,
        n_threads=2,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    model.eval(TOKENS[0].tolist())
    return np.asarray(model.scores[: TOKENS.shape[1]])[None]


@pytest.fixture(scope="module", params=list(CONVERTED))
def family(request, converter, smollm2_path, tmp_path_factory):
    # SmolLM2's tokenizer fits the vocabulary; two Q8_0 blocks per row of D.
    model = hf_model(request.param, vocab_size=49_152, hidden_size=64, intermediate_size=96)
    directory = tmp_path_factory.mktemp("converted") / request.param
    model.save_pretrained(directory)
    save_tokenizer(load_tokenizer(smollm2_path), directory)
    with torch.no_grad():
        reference = model(torch.tensor(TOKENS)).logits.numpy()
    pre = CONVERTED[request.param]
    files = {outtype: convert(converter, directory, outtype, pre) for outtype in ("f32", "q8_0")}
    return request.param, directory, files, reference, model


def test_the_f32_file_holds_the_directory_bitwise_and_matches_both_references(family):
    """Bitwise but for Gemma's norms, which the file holds as 1 + w: w comes back within the
    float32 rounding of that sum."""
    name, directory, files, reference, _ = family
    config, params = load_gguf(files["f32"])
    _, directory_params = load_checkpoint(directory)
    pairs = zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree.leaves(directory_params),
        strict=True,
    )
    for (path, ours), theirs in pairs:
        stored_plus_one = config.features.norm_plus_one and "norm" in jax.tree_util.keystr(path)
        atol = 2**-23 if stored_plus_one else 0
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol, err_msg=str(path))
    logits = np.asarray(forward(params, TOKENS, config))
    np.testing.assert_allclose(logits, reference, atol=LOGITS_ATOL)
    atol = LLAMA_CPP_ATOL.get(name, 1e-5)
    np.testing.assert_allclose(logits, llama_cpp_logits(files["f32"]), atol=atol)


def test_a_gguf_lora_scanlab_writes_gives_its_logits_in_llama_cpp(family, tmp_path):
    """`save_adapter(... .gguf)`: llama.cpp's own LoRA file, loaded by llama.cpp over the F32
    file, gives the logits of scanlab's adapted model (q/k's rotary pairs interleaved as the
    file's weights are)."""
    name, _, files, _, _ = family
    model = load_model(files["f32"], weights="float32")
    lora = LoraConfig(rank=4, alpha=8.0)  # all seven projections
    adapters = init_adapters(model.config, lora, jax.random.PRNGKey(1))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), len(adapters)))
    for pair in adapters.values():
        pair["b"] = 0.1 * jax.random.normal(next(keys), pair["b"].shape)
    tuned = model._replace(params=adapt(model.params, adapters, lora))
    path = save_adapter(tmp_path / "lora.gguf", tuned)
    ours = np.asarray(forward(tuned.params, TOKENS, model.config))
    base = np.asarray(forward(model.params, TOKENS, model.config))
    assert np.abs(ours - base).max() > 0.01  # the adapters change the logits
    atol = LLAMA_CPP_ATOL.get(name, 1e-5) + 1e-5
    np.testing.assert_allclose(ours, llama_cpp_logits(files["f32"], path), atol=atol)


def test_the_q8_0_file_is_read_as_llama_cpp_reads_it(family):
    """scanlab, as users load it, on the quantized file: within Q8_0's rounding of transformers,
    and nearer llama.cpp's logits on the file than the unquantized model is (the same rounded
    weights read, not other ones)."""
    _, _, files, reference, _ = family
    model = load_model(files["q8_0"])
    logits = np.asarray(forward(model.params, TOKENS, model.config))
    theirs = llama_cpp_logits(files["q8_0"])
    np.testing.assert_allclose(logits, reference, atol=Q8_0_ATOL)
    assert np.abs(logits - theirs).max() < 0.75 * np.abs(reference - theirs).max()


def test_the_files_tokenizer_encodes_as_transformers_does_the_directory(family):
    """transformers splits a qwen2 directory's text as Qwen2 does, whatever its tokenizer.json
    says, and the converter was told so: the file's tokenizer follows."""
    _, directory, files, _, _ = family
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    text = "Hello, world! 12345 + 678 = 13023\n  ünïcödé 日本語 <|im_start|>user\n\n  x"
    ids = load_tokenizer(files["f32"]).encode(text)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]


def test_a_chat_on_the_file_decodes_transformers_greedy_tokens(family):
    """The file as `scanlab chat` loads it: its chat template, its tokenizer, its weights."""
    _, _, files, _, model = family
    loaded = load_model(files["f32"])
    text = loaded.tokenizer.chat([{"role": "user", "content": "What is the capital of France?"}])
    prompt = np.array([loaded.tokenizer.encode(text, add_special_tokens=False)])
    ours = generate(loaded.params, prompt, loaded.config, 12)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(model, prompt, 12))
