"""libmtmd, llama.cpp's image encoder, driven through the installed llama-cpp-python's
`llama_cpp.mtmd_cpp` (imported when an `Mtmd` is made): the reference image embeddings of
tests/test_mtmd.py and scripts/bench_mtmd.py. Its mmproj files come from
`vlm.testing.llama_cpp_convert`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def _quiet(level, text, user_data) -> None:
    """llama.cpp's log callback that drops every line."""


class Mtmd:
    """libmtmd's image encoder on an mmproj file: `encode(rgb)` -> the projected image embeddings
    (tokens x text width), computed on the CPU with llama.cpp's own preprocessing.

    mtmd reads its image markers' tokens from a text model, so one (any GGUF of the same width)
    is loaded too.
    """

    def __init__(self, mmproj: Path, text_gguf: Path, threads: int = 2, verbose: bool = False):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._llama, self._mtmd = llama_cpp, mtmd_cpp
        if not verbose:
            self._log = llama_cpp.llama_log_callback(_quiet)  # kept alive: C holds the pointer
            llama_cpp.llama_log_set(self._log, None)
            mtmd_cpp.mtmd_log_set(self._log, None)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {text_gguf}")
        ctx_params = mtmd_cpp.mtmd_context_params_default()
        ctx_params.use_gpu = False
        ctx_params.print_timings = False
        ctx_params.warmup = False
        ctx_params.n_threads = threads
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self._model, ctx_params)
        if not self._ctx:
            raise RuntimeError(f"mtmd could not load {mmproj}")
        self.width = llama_cpp.llama_model_n_embd(self._model)

    def encode(self, rgb: np.ndarray) -> list[np.ndarray]:
        """The embeddings of each image chunk mtmd makes of an (H, W, 3) uint8 image, in prompt
        order (one chunk per image for the projectors here; tiles are rows within it)."""
        m = self._mtmd
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        bitmap = m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        try:
            text = m.mtmd_input_text(text=m.mtmd_default_marker(), text_len=len(m.mtmd_default_marker()),
                                     add_special=False, parse_special=True)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise RuntimeError("mtmd could not tokenize the image")
            out = []
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                if m.mtmd_encode_chunk(self._ctx, chunk) != 0:
                    raise RuntimeError("mtmd could not encode the image")
                n = m.mtmd_input_chunk_get_n_tokens(chunk)
                embd = np.ctypeslib.as_array(m.mtmd_get_output_embd(self._ctx), shape=(n * self.width,))
                out.append(embd.reshape(n, self.width).copy())
            return out
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Mtmd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
