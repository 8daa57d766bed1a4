"""Tiny random checkpoints for tests and benchmarks, built locally in seconds.

    from vlm.testing.tiny_llm import make_tiny_llm          # Llama / Qwen2 text decoders
    from vlm.testing.tiny_qwen2vl import make_tiny_qwen2vl  # needs torch + transformers + gguf
    from vlm.testing.tiny_smolvlm import make_tiny_smolvlm  # needs torch + transformers + gguf

The vision makers build SmolLM2's tokenizer from its GGUF (`vlm pull smollm2-135m`), which
transformers reads with the `gguf` package. scripts/make_tiny_*.py run them from the shell.
"""

from vlm.registry import KNOWN_MODELS, weights_dir

# SmolLM2's GGUF, whose tokenizer the vision makers extend (fetched by `vlm pull smollm2-135m`).
SMOLLM2_GGUF = weights_dir() / KNOWN_MODELS["smollm2-135m"].filename
