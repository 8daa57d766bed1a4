"""Build a tiny random checkpoint: `python scripts/make_tiny_qwen2vl.py OUT_DIR` (see vlm/testing/tiny_qwen2vl.py)."""

from vlm.testing.tiny_qwen2vl import main

if __name__ == "__main__":
    main()
