"""Decoder families as declarations: what each one's blocks compute, and its parameters.

A family (Llama, Qwen2, Gemma 3, Qwen3, SmolLM3) is one `Family`: its features (norm form, MLP
activation, embedding scale, the repeating pattern of sliding-window and full attention layers)
and one `Leaf` per parameter (shape, initialisation, placement, names in transformers and GGUF
files). The block math reads the features and the leaves a family has: a `q_norm` leaf means q/k
norms, `post_attn_norm` and `post_mlp_norm` the "sandwich" norms, `q_bias` biased projections.
No code compares family names; a new family is a new `Family` here (its config keys included).

Shapes are written in the package's dimension letters. A layer leaf is declared for one layer;
the stacked tree adds the leading layer axis L.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from scanlab.decoder.params import Attention, DecoderBlock, DecoderParams

if TYPE_CHECKING:
    from scanlab.decoder.config import DecoderConfig

# The two kinds of attention layer, in transformers' spelling (Gemma3TextConfig.layer_types).
SLIDING = "sliding_attention"  # keys within config.sliding_window positions of the query
FULL = "full_attention"  # every earlier key


class Leaf(NamedTuple):
    """The declaration of one parameter.

    Attributes:
      shape: the config's letters, one per axis, e.g. "D R K Dh" (one layer, no L).
      init: "ones", "zeros", or "normal" with std 1/sqrt(product of the `fan_in` letters).
      fan_in: letters of the fan-in for "normal" ("" for std 1).
      hf_name: the transformers tensor name; layer leaves sit under "model.layers.{i}.".
      hf_layout: the transformers tensor's axes as groups of letters, "(K R Dh) D" meaning a
        2-d tensor whose first axis flattens K, R and Dh in that order.
      gguf_name: the GGUF (llama.cpp) tensor name; layer leaves sit under "blk.{i}.". GGUF
        tensors have the transformers layout, but see `gguf_interleaved` and `gguf_offset`.
      gguf_interleaved: llama.cpp stores the Dh axis of Llama's q and k projections with the
        rotary pairs interleaved (Meta's order) instead of transformers' two halves.
      gguf_offset: what llama.cpp's converter added to the values (1 for Gemma's norms, whose
        files hold the scale 1 + w).
      sharded: False to replicate the leaf whatever its letters (norms: small and read whole).
      quantizable: a weight matrix that may be kept as quantized blocks
        (`scanlab.decoder.quant`), blocked along its input axis: the last letter of `hf_layout`,
        as in GGUF files.
      present: which configs have the leaf (default: all of the family's).
    """

    shape: str
    init: str
    fan_in: str = ""
    hf_name: str = ""
    hf_layout: str = ""
    gguf_name: str = ""
    gguf_interleaved: bool = False
    gguf_offset: float = 0.0
    sharded: bool = True
    quantizable: bool = False
    present: Callable[[DecoderConfig], bool] = lambda config: True

    @property
    def input_letter(self) -> str:
        """The letter of the file's input axis, the last of `hf_layout`: where blocks run."""
        return self.hf_layout.replace(")", " ").split()[-1]

    @property
    def blocked_axis(self) -> int:
        """The input letter's axis in `shape`, counted from the end (as `QuantArray.axis`)."""
        letters = self.shape.split()
        return letters.index(self.input_letter) - len(letters)


@dataclasses.dataclass(frozen=True)
class Family:
    """A decoder family: its features and its parameter declarations.

    Attributes:
      name: the `DecoderConfig.family` value.
      leaves: a DecoderParams of `Leaf`s; None where the family has no such parameter.
      hf_architecture, hf_model_type: transformers' names (config.json) of the causal LM.
      gguf_architecture: llama.cpp's `general.architecture`; a file of it reads as the first
        family declared with it (llama.cpp writes Mistral's as "llama").
      activation: the gated MLP's activation, a name in `scanlab.decoder.layers.ACTIVATIONS`.
      norm_plus_one: RMSNorm scales by 1 + w (w initialised to 0) instead of w.
      embed_scale: the embedded tokens are multiplied by sqrt(D).
      layer_pattern: the kinds of consecutive layers (SLIDING or FULL), repeated over the stack.
      hf_false_flags: transformers config flags of features scanlab does not implement for this
        family: written false, refused when true.
      hf_activation_key: the config key naming the MLP's activation.
      hf_query_scalar: the config always states `query_pre_attn_scalar` (transformers' default
        for the family is not head_dim^-1/2).
      hf_null_keys: transformers config keys of features scanlab does not implement whose
        default for the family is on (Gemma 3's softcappings, Mistral's sliding window): written
        null, refused when set.
      no_rope_interval: every this-many-th layer rotates nothing (SmolLM3's 4: transformers'
        default, llama.cpp's rule); None: every layer rotates. A transformers config may list
        the layers instead (`no_rope_layers`).
    """

    name: str
    leaves: DecoderParams[Leaf]
    hf_architecture: str
    hf_model_type: str
    gguf_architecture: str
    activation: str = "silu"
    norm_plus_one: bool = False
    embed_scale: bool = False
    layer_pattern: tuple[str, ...] = (FULL,)
    hf_false_flags: tuple[str, ...] = ()
    hf_activation_key: str = "hidden_act"
    hf_query_scalar: bool = False
    hf_null_keys: tuple[str, ...] = ()
    no_rope_interval: int | None = None

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_pattern

    def no_rope_layers(self, n_layers: int, interval: int | None = None) -> tuple[int, ...]:
        """The layers without rotary by the family's rule (or another `interval`)."""
        interval = interval or self.no_rope_interval
        if interval is None:
            return ()
        return tuple(i for i in range(n_layers) if (i + 1) % interval == 0)


def _norm(hf_name: str, gguf_name: str, init: str = "ones", shape: str = "D", offset=0.0) -> Leaf:
    return Leaf(
        shape,
        init,
        hf_name=hf_name,
        hf_layout=shape,
        gguf_name=gguf_name,
        gguf_offset=offset,
        sharded=False,
    )


def _bias(shape: str, hf_name: str, hf_layout: str, gguf_name: str) -> Leaf:
    return Leaf(shape, "zeros", hf_name=hf_name, hf_layout=hf_layout, gguf_name=gguf_name)


def _weight(shape: str, fan_in: str, hf_name: str, hf_layout: str, gguf_name: str, **kw) -> Leaf:
    return Leaf(shape, "normal", fan_in, hf_name, hf_layout, gguf_name, quantizable=True, **kw)


# Absent when the embedding is tied (the output head reuses it): GGUF files tell by its name.
LM_HEAD = _weight(
    "D V",
    "D",
    "lm_head.weight",
    "V D",
    "output.weight",
    present=lambda config: not config.tie_embeddings,
)

_LLAMA_ATTENTION = Attention(
    q_proj=_weight(
        "D R K Dh",
        "D",
        "self_attn.q_proj.weight",
        "(K R Dh) D",
        "attn_q.weight",
        gguf_interleaved=True,
    ),
    k_proj=_weight(
        "D K Dh",
        "D",
        "self_attn.k_proj.weight",
        "(K Dh) D",
        "attn_k.weight",
        gguf_interleaved=True,
    ),
    v_proj=_weight("D K Dh", "D", "self_attn.v_proj.weight", "(K Dh) D", "attn_v.weight"),
    out_proj=_weight(
        "R K Dh D",
        "R K Dh",
        "self_attn.o_proj.weight",
        "D (K R Dh)",
        "attn_output.weight",
    ),
)

_LLAMA_LEAVES = DecoderParams(
    embed=_weight("V D", "", "model.embed_tokens.weight", "V D", "token_embd.weight"),
    blocks=DecoderBlock(
        input_norm=_norm("input_layernorm.weight", "attn_norm.weight"),
        attention=_LLAMA_ATTENTION,
        # transformers calls Llama's pre-MLP norm the post-attention one.
        mlp_norm=_norm("post_attention_layernorm.weight", "ffn_norm.weight"),
        gate_proj=_weight("D F", "D", "mlp.gate_proj.weight", "F D", "ffn_gate.weight"),
        up_proj=_weight("D F", "D", "mlp.up_proj.weight", "F D", "ffn_up.weight"),
        down_proj=_weight("F D", "F", "mlp.down_proj.weight", "D F", "ffn_down.weight"),
    ),
    final_norm=_norm("model.norm.weight", "output_norm.weight"),
    lm_head=LM_HEAD,
)

LLAMA = Family(
    name="llama",
    leaves=_LLAMA_LEAVES,
    hf_architecture="LlamaForCausalLM",
    hf_model_type="llama",
    gguf_architecture="llama",
    hf_false_flags=("attention_bias", "mlp_bias", "use_sliding_window"),
)


def _not_interleaved(attention: Attention[Leaf]) -> Attention[Leaf]:
    return attention._replace(
        q_proj=attention.q_proj._replace(gguf_interleaved=False),
        k_proj=attention.k_proj._replace(gguf_interleaved=False),
    )


# The Llama block with biases on the q, k and v projections; llama.cpp keeps q/k as they are.
QWEN2 = Family(
    name="qwen2",
    leaves=_LLAMA_LEAVES._replace(
        blocks=_LLAMA_LEAVES.blocks._replace(
            attention=_not_interleaved(_LLAMA_ATTENTION)._replace(
                q_bias=_bias("R K Dh", "self_attn.q_proj.bias", "(K R Dh)", "attn_q.bias"),
                k_bias=_bias("K Dh", "self_attn.k_proj.bias", "(K Dh)", "attn_k.bias"),
                v_bias=_bias("K Dh", "self_attn.v_proj.bias", "(K Dh)", "attn_v.bias"),
            )
        )
    ),
    hf_architecture="Qwen2ForCausalLM",
    hf_model_type="qwen2",
    gguf_architecture="qwen2",
    hf_false_flags=("use_sliding_window",),
)


def _gemma_norm(hf_name: str, gguf_name: str, shape: str = "D") -> Leaf:
    # Gemma's RMSNorm scales by 1 + w: w starts at 0, and the GGUF holds 1 + w.
    return _norm(hf_name, gguf_name, init="zeros", shape=shape, offset=1.0)


# Sandwich norms around attention and MLP, RMS-normed q and k heads, GELU(tanh) MLP, embeddings
# scaled by sqrt(D), and five sliding-window layers for each full one (transformers' and
# llama.cpp's pattern; neither file format records it).
GEMMA3 = Family(
    name="gemma3",
    leaves=_LLAMA_LEAVES._replace(
        blocks=_LLAMA_LEAVES.blocks._replace(
            input_norm=_gemma_norm("input_layernorm.weight", "attn_norm.weight"),
            attention=_not_interleaved(_LLAMA_ATTENTION)._replace(
                q_norm=_gemma_norm("self_attn.q_norm.weight", "attn_q_norm.weight", "Dh"),
                k_norm=_gemma_norm("self_attn.k_norm.weight", "attn_k_norm.weight", "Dh"),
            ),
            post_attn_norm=_gemma_norm(
                "post_attention_layernorm.weight", "post_attention_norm.weight"
            ),
            mlp_norm=_gemma_norm("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
            post_mlp_norm=_gemma_norm("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
        ),
        final_norm=_gemma_norm("model.norm.weight", "output_norm.weight"),
    ),
    hf_architecture="Gemma3ForCausalLM",
    hf_model_type="gemma3_text",
    gguf_architecture="gemma3",
    activation="gelu_tanh",
    norm_plus_one=True,
    embed_scale=True,
    layer_pattern=(SLIDING,) * 5 + (FULL,),
    hf_activation_key="hidden_activation",
    hf_query_scalar=True,
    hf_null_keys=("attn_logit_softcapping", "final_logit_softcapping"),
)

# Qwen3: Llama's block with RMS-normed q and k heads (plain norms) and no biases; its head width
# is stated, not D / heads. llama.cpp keeps q/k as they are.
QWEN3 = Family(
    name="qwen3",
    leaves=_LLAMA_LEAVES._replace(
        blocks=_LLAMA_LEAVES.blocks._replace(
            attention=_not_interleaved(_LLAMA_ATTENTION)._replace(
                q_norm=_norm("self_attn.q_norm.weight", "attn_q_norm.weight", shape="Dh"),
                k_norm=_norm("self_attn.k_norm.weight", "attn_k_norm.weight", shape="Dh"),
            )
        )
    ),
    hf_architecture="Qwen3ForCausalLM",
    hf_model_type="qwen3",
    gguf_architecture="qwen3",
    hf_false_flags=("attention_bias", "use_sliding_window"),
)

# SmolLM3: Llama's block, some layers without rotary embeddings (every fourth by default).
SMOLLM3 = Family(
    name="smollm3",
    leaves=_LLAMA_LEAVES,
    hf_architecture="SmolLM3ForCausalLM",
    hf_model_type="smollm3",
    gguf_architecture="smollm3",
    hf_false_flags=("attention_bias", "mlp_bias", "use_sliding_window"),
    no_rope_interval=4,
)

# Mistral 7B v0.2+: Llama's block under another name; v0.1's sliding window is refused.
MISTRAL = dataclasses.replace(
    LLAMA,
    name="mistral",
    hf_architecture="MistralForCausalLM",
    hf_model_type="mistral",
    hf_false_flags=(),
    hf_null_keys=("sliding_window",),
)

FAMILIES: dict[str, Family] = {
    family.name: family for family in (LLAMA, QWEN2, GEMMA3, QWEN3, SMOLLM3, MISTRAL)
}
