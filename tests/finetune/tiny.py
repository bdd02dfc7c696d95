"""The tiny decoder the fine-tuning tests train: SmolLM2's vocabulary (the real tokenizer renders
their chat data) over two small layers."""

from scanlab.decoder import DecoderConfig

TINY = DecoderConfig(
    vocab_size=49152,
    n_layers=2,
    d_model=64,
    n_heads=2,
    n_kv_heads=1,
    head_dim=32,
    mlp_dim=64,
    max_seq_len=64,
)
