"""Byte-level vocabularies split as their merges were learned: each `tokenizer.ggml.pre` name
scanlab reads (GPT-2's, Llama 3's, Qwen2's regex) against transformers' own GGUF tokenizer on the
same file, on strings that tell the splits apart (digit runs, contractions, blank runs, scripts).

The vocabulary and merges are SmolLM2's (the only byte-level file at hand) plus merges of digits,
which SmolLM2 lacks and Llama 3's and Qwen2's splits treat differently; the split is what differs
between the files, so each name's file is that vocabulary with that name."""

import gguf
import numpy as np
import pytest
from tests.decoder.formats.gguf_files import oracle_reader
from transformers import AutoTokenizer

from scanlab.decoder import CheckpointError, load_tokenizer
from scanlab.decoder.formats.gguf_file import metadata, open_gguf

pytestmark = pytest.mark.slow  # reads SmolLM2's vocabulary from its file

TRICKY = [
    "Hello, world! 12345 + 678 = 13023 and 3.14159",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \nend",
    "3 33 333 3333 33333 333333 3.3 3..3 ------======= нещо на Български",
    "''''''```````\"\"\"\"......!!!!!!?????? 🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙",
    "  spaces\n\ttabs, ünïcödé, 日本語 and 我想在apple工作1314151天～",
    "def f(x):\n    return x**2  # comment\r\n\r\n",
    "<|im_start|>user\nhi<|im_end|>\n",
]


# Tokens of digits merged (runs of up to three, as Llama 3 splits numbers; Qwen2 splits digits).
DIGIT_MERGES = ["3 3", "33 3", "1 2", "12 3", "4 5"]


def write_tokenizer_file(path, source, pre: str):
    """A GGUF holding `source`'s byte-level vocabulary and merges, and DIGIT_MERGES, under the
    split `pre`."""
    digit_tokens = [merge.replace(" ", "") for merge in DIGIT_MERGES]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(metadata(source, "tokenizer.ggml.tokens") + digit_tokens)
    normal = [gguf.TokenType.NORMAL] * len(digit_tokens)
    writer.add_token_types(metadata(source, "tokenizer.ggml.token_type") + normal)
    writer.add_token_merges(metadata(source, "tokenizer.ggml.merges") + DIGIT_MERGES)
    writer.add_bos_token_id(metadata(source, "tokenizer.ggml.bos_token_id"))
    writer.add_eos_token_id(metadata(source, "tokenizer.ggml.eos_token_id"))
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", np.zeros((1, 1), np.float32))  # transformers reads one
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def files(smollm2_path, tmp_path_factory):
    folder, source = tmp_path_factory.mktemp("splits"), open_gguf(smollm2_path)
    for pre in ("smollm", "llama-bpe", "qwen2"):
        write_tokenizer_file(folder / f"{pre}.gguf", source, pre)
    return folder


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_splits_equal_transformers(files, pre):
    ours = load_tokenizer(files / f"{pre}.gguf")
    with oracle_reader():
        theirs = AutoTokenizer.from_pretrained(files, gguf_file=f"{pre}.gguf")
    for text in TRICKY:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_the_three_splits_differ_on_these_strings(files):
    """Otherwise the comparison above could not tell a split left unread."""
    encodings = {
        pre: [load_tokenizer(files / f"{pre}.gguf").encode(text) for text in TRICKY]
        for pre in ("smollm", "llama-bpe", "qwen2")
    }
    for one, other in (("smollm", "llama-bpe"), ("llama-bpe", "qwen2"), ("smollm", "qwen2")):
        assert encodings[one] != encodings[other], (one, other)


def test_an_unknown_split_is_refused_by_name(files, smollm2_path):
    write_tokenizer_file(files / "tekken.gguf", open_gguf(smollm2_path), "tekken")
    with pytest.raises(
        CheckpointError,
        match=r"tokenizer.ggml.pre one of \[.*'llama-bpe'.*got model='gpt2', pre='tekken'",
    ):
        load_tokenizer(files / "tekken.gguf")


def test_a_sentencepiece_vocabulary_with_a_prefix_space_is_refused_by_name(tmp_path):
    """Llama 2's and Mistral's GGUF vocabularies prefix a space; only Gemma's kind is read."""
    writer = gguf.GGUFWriter(tmp_path / "spm.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
    writer.add_eos_token_id(2)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(
        CheckpointError,
        match=r"tokenizer\.ggml\.add_space_prefix true: Llama 2's, Mistral's\) is not read yet",
    ):
        load_tokenizer(tmp_path / "spm.gguf")
