"""Text <-> token ids: the checkpoint's own tokenizer through the `tokenizers` library, and its chat
template rendered by jinja2 as transformers renders it.

A transformers directory carries `tokenizer.json`, its special tokens in `tokenizer_config.json`
and the template in `chat_template.jinja` (or, written by older versions, `tokenizer_config.json`);
a GGUF file carries the vocabulary, the special tokens and the template in its metadata, from
which the `tokenizers.Tokenizer` transformers would build is built: byte-level BPE with its merges
(`tokenizer.ggml.model` "gpt2": SmolLM2, Llama 3, Qwen2/3), its text first split as the
vocabulary's merges were learned (`tokenizer.ggml.pre`: `SPLITS`), or SentencePiece's
byte-fallback BPE, whose merges Gemma files leave out (`tokenizer.ggml.model` "llama").
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from scanlab.decoder.formats.base import CheckpointError, read_json
from scanlab.decoder.formats.gguf_file import metadata, open_gguf
from scanlab.errors import ArgumentError

Message = dict[str, str]  # {"role": "user", "content": "..."}

# llama.cpp's names of pre-tokenizers that split text as GPT-2's byte-level regex does; SmolLM's
# vocabulary has no merges between digits, so its "smollm" splitting of digits comes out the same.
GPT2_PRE_TOKENIZERS = ("default", "gpt2", "smollm")
# The patterns of the tokenizer.json files of Llama 3 and Qwen2 (llama.cpp's llama-vocab.cpp
# spells the same ones): numbers in runs of up to three digits, or one digit at a time.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class Split:
    """How a byte-level vocabulary splits text before its merges: a regex (None: GPT-2's, built
    into `tokenizers`' ByteLevel), and whether a piece found whole in the vocabulary is taken
    whole before any merge (Llama 3's `ignore_merges`)."""

    pattern: str | None = None
    whole_pieces_first: bool = False


# `tokenizer.ggml.pre` -> Split, under the names llama.cpp's converter writes.
SPLITS: dict[str, Split] = {
    **{name: Split() for name in GPT2_PRE_TOKENIZERS},
    **{name: Split(_LLAMA3_SPLIT, True) for name in ("llama-bpe", "llama3", "llama-v3")},
    **{name: Split(_QWEN2_SPLIT) for name in ("qwen2", "deepseek-r1-qwen")},
}
# llama.cpp's token types: special tokens such as <|im_end|>, and ones always matched whole.
_CONTROL, _USER_DEFINED = 3, 4
SPIECE_SPACE = "\u2581"  # "▁": how SentencePiece vocabularies spell a space


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A checkpoint's tokenizer.

    Attributes:
      backend: the `tokenizers.Tokenizer` doing the work.
      chat_template: the checkpoint's jinja2 chat template, or None.
      eos_ids: the token ids that end generation (end of text, end of turn).
      bos_token, eos_token: their spellings, as chat templates refer to them.
      pad_id: the id a finished row emits.
    """

    backend: tokenizers.Tokenizer
    chat_template: str | None
    eos_ids: tuple[int, ...]
    bos_token: str
    eos_token: str
    pad_id: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it (<|im_start|>) stay whole.

        With `add_special_tokens`, what the checkpoint adds to a text is added (Gemma's BOS);
        a chat template's rendering writes its own, so it is encoded without.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        """The text of token ids, special tokens left out."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the checkpoint's chat template, ready to encode (with
        add_special_tokens=False)."""
        if self.chat_template is None:
            raise ArgumentError(NO_CHAT_TEMPLATE)
        check_messages(messages)
        return (
            _environment()
            .from_string(self.chat_template)
            .render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        )


NO_CHAT_TEMPLATE = (
    "this model has no chat template (a base model, not instruction-tuned): give it a plain "
    "text prompt to continue instead (scanlab decoder generate --prompt TEXT)"
)


def check_messages(messages) -> None:
    """Each message a dict with string 'role' and 'content'."""
    if not isinstance(messages, list) or not messages:
        raise ArgumentError(f"messages must be a non-empty list of dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ArgumentError(
                f"messages[{i}] must be a dict with string 'role' and 'content', got {message!r}"
            )


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _environment() -> jinja2.Environment:
    # transformers' settings, so a template renders to the same text as apply_chat_template.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise
    return env


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a .gguf file or of a transformers checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return _from_directory(path)
    return _from_gguf(path)


def _from_gguf(path: Path) -> Tokenizer:
    reader = open_gguf(path)
    kind = metadata(reader, "tokenizer.ggml.model")
    pre = metadata(reader, "tokenizer.ggml.pre", "default")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{path}: the tokenizer's vocabulary is missing")
    if kind == "gpt2" and pre in SPLITS:
        merges = metadata(reader, "tokenizer.ggml.merges")
        backend = _byte_level_bpe(tokens, merges, SPLITS[pre], path)
        add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        if metadata(reader, "tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default
            raise CheckpointError(
                f"{path}: a SentencePiece vocabulary that prefixes a space "
                f"(tokenizer.ggml.add_space_prefix true: Llama 2's, Mistral's) is not read yet; "
                f"Gemma's (false) is"
            )
        backend = _sentencepiece_bpe(tokens)
        add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", True))
    else:
        raise CheckpointError(
            f"{path}: the tokenizer must be byte-level BPE (tokenizer.ggml.model 'gpt2', "
            f"tokenizer.ggml.pre one of {list(SPLITS)}) or SentencePiece BPE "
            f"(tokenizer.ggml.model 'llama'), got model={kind!r}, pre={pre!r}"
        )
    _add_special_tokens(backend, tokens, metadata(reader, "tokenizer.ggml.token_type", []))
    eos_id = metadata(reader, "tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.eos_token_id is missing")
    bos_id = metadata(reader, "tokenizer.ggml.bos_token_id", eos_id)
    eot_id = metadata(reader, "tokenizer.ggml.eot_token_id", eos_id)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", special_tokens=[(tokens[bos_id], int(bos_id))]
        )
    return Tokenizer(
        backend=backend,
        chat_template=metadata(reader, "tokenizer.chat_template"),
        eos_ids=tuple(dict.fromkeys((int(eos_id), int(eot_id)))),
        bos_token=tokens[bos_id],
        eos_token=tokens[eos_id],
        pad_id=int(metadata(reader, "tokenizer.ggml.padding_token_id", eos_id)),
    )


def _byte_level_bpe(tokens: list[str], merges: list[str] | None, split: Split, path: Path):
    if merges is None:
        raise CheckpointError(f"{path}: the byte-level tokenizer's merges are missing")
    backend = tokenizers.Tokenizer(
        models.BPE(
            {token: i for i, token in enumerate(tokens)},
            [(left, right) for left, _, right in (merge.partition(" ") for merge in merges)],
            fuse_unk=False,
            ignore_merges=split.whole_pieces_first,
        )
    )
    if split.pattern is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # as the tokenizer.json files of Llama 3 and Qwen2 state it
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(split.pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str]):
    """SentencePiece's BPE with byte fallback, as transformers builds Gemma's from a GGUF.

    Tokens made only of spaces are respelled with "▁" (the text's spaces become "▁" before the
    model sees them); the file lists no merges, so they are rebuilt from the vocabulary
    (`merges_in_token_order`).
    """
    spelled = [SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: i for i, token in enumerate(spelled)}
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab,
            merges_in_token_order(spelled, vocab),
            fuse_unk=True,
            unk_token="<unk>",
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return backend


def merges_in_token_order(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary listed best-first: every split of a token into two
    tokens, ranked by the token's place in the list, then the longer left half.

    Gemma's scores do not follow its merge order; its token order does (transformers'
    `generate_merges` with the token positions as scores, written here because `tokenizers`
    builds no merges from a vocabulary).
    """
    rank = {token: -i for i, token in enumerate(tokens)}
    merges = []
    for token, score in rank.items():
        pairs = [
            (token[:cut], token[cut:])
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, score) for left, right in pairs]
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]):
    """Control tokens as special tokens, user-defined ones as added tokens: both kept whole."""
    backend.add_special_tokens(
        [
            tokenizers.AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, types, strict=False)
            if kind == _CONTROL
        ]
    )
    vocab = backend.get_vocab()
    backend.add_tokens(
        [
            tokenizers.AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, types, strict=False)
            if kind == _USER_DEFINED and token in vocab
        ]
    )


def _from_directory(directory: Path) -> Tokenizer:
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{directory} must contain tokenizer.json, the tokenizer")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{file} is not a readable tokenizer: {error}") from None
    settings = _json(directory / "tokenizer_config.json")
    generation = _json(directory / "generation_config.json")
    eos_token = _spelling(settings.get("eos_token"))
    eos_ids = generation.get("eos_token_id", backend.token_to_id(eos_token or ""))
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    if None in eos_ids or not eos_ids:
        raise CheckpointError(f"{directory}: no end-of-sequence token is named")
    pad = _spelling(settings.get("pad_token"))
    template_file = directory / "chat_template.jinja"  # where transformers >= 4.54 writes it
    return Tokenizer(
        backend=backend,
        chat_template=(
            template_file.read_text() if template_file.is_file() else settings.get("chat_template")
        ),
        eos_ids=tuple(int(i) for i in eos_ids),
        bos_token=_spelling(settings.get("bos_token")) or "",
        eos_token=eos_token or backend.id_to_token(eos_ids[0]) or "",
        pad_id=_pad_id(backend, pad, eos_ids[0]),
    )


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Writes the tokenizer as a transformers directory holds it (what `_from_directory` and
    transformers' AutoTokenizer read): tokenizer.json, its special tokens, the chat template."""
    directory = Path(directory)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token or None,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.backend.id_to_token(tokenizer.pad_id),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    generation = {"eos_token_id": list(tokenizer.eos_ids)}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer.chat_template is not None:
        (directory / "chat_template.jinja").write_text(tokenizer.chat_template)


def _pad_id(backend: tokenizers.Tokenizer, pad: str | None, eos_id: int) -> int:
    """The id of the pad token tokenizer_config.json names, else the end-of-sequence id."""
    if not pad:
        return int(eos_id)
    pad_id = backend.token_to_id(pad)
    if pad_id is None:
        raise CheckpointError(f"pad_token {pad!r} is not in the tokenizer's vocabulary")
    return pad_id


def _spelling(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _json(path: Path) -> dict:
    """The JSON file's contents; an absent optional file is empty."""
    return read_json(path) if path.is_file() else {}
