"""Build a tiny random checkpoint: `python scripts/make_tiny_llm.py OUT_DIR` (see vlm/testing/tiny_llm.py)."""

from vlm.testing.tiny_llm import main

if __name__ == "__main__":
    main()
