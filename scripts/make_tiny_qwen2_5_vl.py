"""Build a tiny test file: `python scripts/make_tiny_qwen2_5_vl.py ...` (see vlm/testing/tiny_qwen2_5_vl.py)."""

from vlm.testing.tiny_qwen2_5_vl import main

if __name__ == "__main__":
    main()
