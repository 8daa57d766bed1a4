"""Instructions the AArch64 kernels execute per 32-weight block and token, counted under qemu.

    python scripts/arm_instruction_counts.py [--tokens 1,64] [--formats q4_asym,q4_sym,q8]

Cross-compiles tests/arm/harness.c (as tests/test_arm_kernels.py does), runs one product of a
256 x 1024 group-32 matrix per path, format and token count under `qemu-aarch64 -cpu max` with
its execution log limited to the path's GEMM function (`-d in_asm,exec,nochain -dfilter`),
and adds up the instructions of every executed block. The count is exact for the code as
compiled (spills, loop overhead, prefetches included); it says nothing about cycles. Needs
aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu, qemu-user).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_arm_kernels import KERNELS, SOURCES  # noqa: E402  (the harness's build, declared once)

ROWS, COLS = 256, 1024
# the kernel files in link order: their static gemm_* functions appear in this order
LINKED = ["portable", "neon", "dotprod", "i8mm"]
# the multiply instructions: the int8 ones (SDOT / SMMLA, or the four that stand in for an SDOT
# on plain NEON) and FMLA for float activations (where it also applies the scales)
MAC = {"int8": ("sdot", "smmla", "smull", "smull2", "addp", "sadalp"), "float": ("fmla",)}


def mnemonic(line: str) -> str:
    """The instruction of a log line; qemu 7's disassembler prints SDOT and SMMLA as .byte."""
    fields = line.split()
    if fields[2] != ".byte":
        return fields[2]
    return "smmla" if int(fields[1], 16) & 0xFFE0FC00 == 0x4E80A400 else "sdot"
LOAD, STORE = ("ld",), ("st",)


def build(out: Path) -> Path:
    exe = out / "harness"
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if not cc or not shutil.which("qemu-aarch64"):
        raise SystemExit("needs aarch64-linux-gnu-gcc and qemu-aarch64")
    subprocess.run([cc, "-O2", "-static", "-pthread", f"-I{KERNELS}", str(ROOT / "tests/arm/harness.c"),
                    *(str(KERNELS / s) for s in SOURCES), "-lm", "-o", str(exe)], check=True)
    return exe


def functions(exe: Path, name: str) -> dict[str, tuple[int, int]]:
    """Address and size of each path's static `name` function."""
    nm = subprocess.run(["aarch64-linux-gnu-nm", "-S", "-n", str(exe)], capture_output=True, text=True, check=True)
    found = [line.split() for line in nm.stdout.splitlines() if line.endswith(f" {name}")]
    return {path: (int(f[0], 16), int(f[1], 16)) for path, f in zip(LINKED, found, strict=True)}


def count(exe: Path, fn: tuple[int, int], args: list[str], log: Path) -> collections.Counter:
    """Executed instructions of the function, by mnemonic."""
    subprocess.run(["qemu-aarch64", "-cpu", "max", "-d", "in_asm,exec,nochain", "-dfilter",
                    f"{fn[0]:#x}+{fn[1]:#x}", "-D", str(log), str(exe), "count", *args], check=True,
                   capture_output=True)
    blocks: dict[int, list[str]] = {}
    executed: collections.Counter = collections.Counter()
    current: list[str] | None = None
    with log.open() as f:
        for line in f:
            if line.startswith("IN:"):
                current = []
            elif line.startswith("0x") and current is not None:
                if not current:
                    blocks[int(line.split(":")[0], 16)] = current
                current.append(mnemonic(line))
            elif line.startswith("Trace"):
                current = None
                pc = int(line.split("[")[1].split("/")[1], 16)
                executed[pc] += 1
    mix: collections.Counter = collections.Counter()
    for pc, times in executed.items():
        for op in blocks.get(pc, []):
            mix[op] += times
    log.unlink()
    return mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,64")
    ap.add_argument("--formats", default="q4_asym,q4_sym,q8")
    ap.add_argument("--modes", default="int8,float")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        fns = {"int8": functions(exe, "gemm_int8"), "float": functions(exe, "gemm_float")}
        print("| path | format | activations | tokens | instructions | multiply instructions | loads | stores |")
        print("|---|---|---|---|---|---|---|---|")
        for mode in args.modes.split(","):
            for fmt in args.formats.split(","):
                for path in ("neon", "dotprod", "i8mm"):
                    if mode == "float" and path != "neon":
                        continue  # the float kernels are the same source on every path
                    for n in map(int, args.tokens.split(",")):
                        mix = count(exe, fns[mode][path], [path, fmt, mode, str(n)], Path(tmp) / "log")
                        per = ROWS * COLS // 32 * n
                        total = sum(mix.values())
                        macs = sum(v for k, v in mix.items() if k in MAC[mode])
                        loads = sum(v for k, v in mix.items() if k.startswith(LOAD))
                        stores = sum(v for k, v in mix.items() if k.startswith(STORE))
                        top = ", ".join(f"{k} {v / per:.2f}" for k, v in mix.items() if k in MAC[mode])
                        who = "all" if mode == "float" else path
                        print(f"| {who} | {fmt} | {mode} | {n} | {total / per:.2f} | {macs / per:.2f} ({top}) | "
                              f"{loads / per:.2f} | {stores / per:.2f} |")


if __name__ == "__main__":
    main()
