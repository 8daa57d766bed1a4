"""llama.cpp's own tools, driven from Python: its HF -> GGUF converter (from the llama-cpp-python
source distribution) and libmtmd, its image encoder (the installed llama-cpp-python's
`llama_cpp.mtmd_cpp`). Used by tests/test_mtmd.py and scripts/bench_mtmd.py.

    python scripts/llama_cpp_tools.py convert MODEL_DIR OUT.gguf [--mmproj] [--outtype f32|f16|q8_0]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

# The converter needs these parts of the sdist's vendor/llama.cpp (a few MB of a 75 MB archive).
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")

# The converter maps tensor names with a table sized by the tower's depth, and the projector's
# `merger.mlp.2` is looked up as "block" 2: a tiny tower of depth 2 fails to convert. A deeper
# table (the depth written to the file is unchanged) converts it.
CONVERT = """
import runpy, sys
import gguf
table = gguf.get_tensor_name_map
gguf.get_tensor_name_map = lambda arch, n_blocks: table(arch, max(n_blocks, 8))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_source(cache: Path) -> Path:
    """vendor/llama.cpp of the installed llama-cpp-python's source distribution (the converter's
    parts only), downloaded with pip once and kept under `cache`."""
    from importlib.metadata import version

    release = version("llama-cpp-python")
    root = cache / f"llama-cpp-python-{release}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={release}", "-d", tmp], check=True)
        prefix = f"llama_cpp_python-{release}/vendor/llama.cpp/"
        part = Path(tmp) / "unpacked"
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as sdist:
            members = [m for m in sdist.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(CONVERTER_PARTS)]
            for m in members:
                m.name = m.name[len(prefix):]
            sdist.extractall(part, members=members, filter="data")
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.move(str(part), root)  # whole, so a killed download leaves no half tree behind
    return root


def convert(source: Path, model_dir: Path, out: Path, mmproj: bool = False, outtype: str = "f32") -> Path:
    """`out` written by llama.cpp's convert_hf_to_gguf.py from an HF checkpoint (the vision
    projector with mmproj). SmolVLM's (Idefics3) text model converts as llama.cpp's
    `VLlama3ForCausalLM`, from a copy of the folder with that architecture."""
    config = json.loads((model_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        if not mmproj and config.get("model_type") in ("idefics3", "smolvlm"):
            model_dir = Path(shutil.copytree(model_dir, Path(tmp) / "text"))
            (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["VLlama3ForCausalLM"]}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), str(source)])}
        cmd = [sys.executable, "-c", CONVERT, str(source / "convert_hf_to_gguf.py"), str(model_dir),
               "--outtype", outtype, "--outfile", str(out)] + (["--mmproj"] if mmproj else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {model_dir}:\n{done.stderr[-2000:]}")
    return out


def _quiet(level, text, user_data) -> None:
    pass


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    c = sub.add_parser("convert", help="convert an HF checkpoint with llama.cpp's converter")
    c.add_argument("model_dir", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--mmproj", action="store_true")
    c.add_argument("--outtype", default="f32")
    c.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vlm-llama.cpp")
    args = ap.parse_args()
    print(convert(llama_cpp_source(args.cache), args.model_dir, args.out, args.mmproj, args.outtype))


if __name__ == "__main__":
    main()
