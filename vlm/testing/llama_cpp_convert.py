"""llama.cpp's own Hugging Face -> GGUF converter, from the llama-cpp-python source distribution.

    python -m vlm.testing.llama_cpp_convert HF_DIR OUT_DIR [--cache DIR]

The sdist of the installed llama-cpp-python carries llama.cpp's `convert_hf_to_gguf.py` with its
`gguf-py/` and `conversion/` under vendor/llama.cpp. `fetch_converter` downloads it once (pip)
and unpacks those parts; `convert` runs them, on that gguf-py, in one process for several jobs
(torch is imported once). For a vision model it writes llama.cpp's pair: the text GGUF and
`mmproj-<name>.gguf`. SmolVLM/Idefics3 text converts the way llama.cpp converts SmolVLM text
models: from a copy whose config.json says `architectures: ["VLlama3ForCausalLM"]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PARTS = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")


def fetch_converter(cache: Path, version: str | None = None) -> Path:
    """The folder holding llama.cpp's converter of llama-cpp-python `version` (default: the
    installed one), unpacked in `cache` (downloaded on first use); RuntimeError when pip fails."""
    if version is None:
        import llama_cpp

        version = llama_cpp.__version__
    root = cache / f"llama.cpp-{version}"
    if (root / PARTS[0]).is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not sdists:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
               "--disable-pip-version-check", "-d", str(cache), f"llama-cpp-python=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        sdists = sorted(cache.glob(f"llama_cpp_python-{version}.tar.gz"))
        if done.returncode or not sdists:
            raise RuntimeError(f"pip could not download the llama-cpp-python {version} sdist: "
                               f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(dir=cache) as tmp, tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(PARTS)]
        tar.extractall(tmp, members, filter="data")
        Path(tmp, prefix).rename(root)  # whole or not at all: test sessions may share the cache
    return root


# Run in the child: argv[2] is a JSON list of convert_hf_to_gguf.py argument lists; a failing job stops the run.
_DRIVER = """
import json, sys
root, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [root + "/gguf-py", root]
import convert_hf_to_gguf
for job in jobs:
    sys.argv = ["convert_hf_to_gguf.py", *job]
    convert_hf_to_gguf.main()
"""


def convert(converter: Path, hf_dir: Path, out_dir: Path, text: bool = True, mmproj: bool = True,
            outtype: str = "f32") -> tuple[Path | None, Path | None]:
    """(text GGUF, mmproj GGUF) of a Hugging Face VLM directory, written into `out_dir` by
    llama.cpp's converter (each None when not asked for)."""
    return convert_many(converter, [(hf_dir, out_dir, text, mmproj)], outtype)[0]


def convert_many(converter: Path, jobs: list[tuple[Path, Path, bool, bool]], outtype: str = "f32"
                 ) -> list[tuple[Path | None, Path | None]]:
    """`convert` for several (hf_dir, out_dir, text, mmproj) jobs, in one process."""
    argv, results = [], []
    for hf_dir, out_dir, text, mmproj in jobs:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = hf_dir.name
        text_out = out_dir / f"{name}-{outtype}.gguf" if text else None
        mmproj_out = out_dir / f"mmproj-{name}-{outtype}.gguf" if mmproj else None
        if text:
            source = hf_dir
            config = json.loads((hf_dir / "config.json").read_text())
            if config.get("model_type") in ("idefics3", "smolvlm"):  # llama.cpp converts SmolVLM text so
                source = out_dir / f".{name}-text"
                shutil.copytree(hf_dir, source, dirs_exist_ok=True)
                (source / "config.json").write_text(json.dumps({**config, "architectures": ["VLlama3ForCausalLM"]}))
            argv.append([str(source), "--outtype", outtype, "--outfile", str(text_out)])
        if mmproj:
            argv.append([str(hf_dir), "--outtype", outtype, "--mmproj", "--outfile", str(mmproj_out)])
        results.append((text_out, mmproj_out))
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(converter), json.dumps(argv)], capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"llama.cpp's converter failed: {done.stderr.strip()[-2000:]}")
    for _, out_dir, _, _ in jobs:
        for copy in out_dir.glob(".*-text"):
            shutil.rmtree(copy)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vlm" / "llama.cpp-sdist")
    ap.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    args = ap.parse_args()
    for path in convert(fetch_converter(args.cache), args.hf_dir, args.out_dir, outtype=args.outtype):
        print(path)


if __name__ == "__main__":
    main()
