"""Build a tiny random checkpoint: `python scripts/make_tiny_smolvlm.py OUT_DIR` (see vlm/testing/tiny_smolvlm.py)."""

from vlm.testing.tiny_smolvlm import main

if __name__ == "__main__":
    main()
