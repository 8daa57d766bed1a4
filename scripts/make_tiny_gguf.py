"""Build a tiny test file: `python scripts/make_tiny_gguf.py ...` (see vlm/testing/tiny_gguf.py)."""

from vlm.testing.tiny_gguf import main

if __name__ == "__main__":
    main()
