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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Job:
    """One model to convert: what to write (the text GGUF, the mmproj) and at which precision."""

    hf_dir: Path
    out_dir: Path
    text: bool = True
    mmproj: bool = True
    outtype: str = "f32"  # f32, f16, bf16, q8_0

    def outputs(self) -> tuple[Path | None, Path | None]:
        name = self.hf_dir.name
        return (self.out_dir / f"{name}-{self.outtype}.gguf" if self.text else None,
                self.out_dir / f"mmproj-{name}-{self.outtype}.gguf" if self.mmproj else None)


def convert(converter: Path, jobs: list[Job]) -> list[tuple[Path | None, Path | None]]:
    """(text GGUF, mmproj GGUF) of each job's Hugging Face VLM directory (None where not asked
    for), written by llama.cpp's converter, all in one process."""
    argv = []
    for job in jobs:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        text_out, mmproj_out = job.outputs()
        if text_out:
            source = job.hf_dir
            config = json.loads((source / "config.json").read_text())
            if config.get("model_type") in ("idefics3", "smolvlm"):  # llama.cpp converts SmolVLM text so
                source = job.out_dir / f".{job.hf_dir.name}-text"
                shutil.copytree(job.hf_dir, source, dirs_exist_ok=True)
                (source / "config.json").write_text(json.dumps({**config, "architectures": ["VLlama3ForCausalLM"]}))
            argv.append([str(source), "--outtype", job.outtype, "--outfile", str(text_out)])
        if mmproj_out:
            argv.append([str(job.hf_dir), "--outtype", job.outtype, "--mmproj", "--outfile", str(mmproj_out)])
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(converter), json.dumps(argv)], capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"llama.cpp's converter failed: {done.stderr.strip()[-2000:]}")
    for job in jobs:
        for copy in job.out_dir.glob(".*-text"):
            shutil.rmtree(copy)
    return [job.outputs() for job in jobs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vlm" / "llama.cpp-sdist")
    ap.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    args = ap.parse_args()
    for path in convert(fetch_converter(args.cache), [Job(args.hf_dir, args.out_dir, outtype=args.outtype)])[0]:
        print(path)


if __name__ == "__main__":
    main()
