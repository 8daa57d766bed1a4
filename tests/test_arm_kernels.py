"""The AArch64 kernels (vlm/kernels/matmul_neon*.c, attention_neon.c) under emulation.

tests/arm/harness.c is cross-compiled with the kernel sources by Debian's aarch64-linux-gnu-gcc
(a plain one: the dot-product and I8MM code carries its own target attributes) and run by
qemu-aarch64 on three CPU models, so every path is the best one somewhere and its products are
checked there against the portable C (see the harness for what is compared and how tightly):
- max: every extension, the "i8mm" path (SMMLA prefill, SDOT decode);
- cortex-a76 (Raspberry Pi 5): dot product but no I8MM, the "dotprod" path;
- cortex-a72 (Raspberry Pi 4): neither, the "neon" path (widening multiplies).
.ci/run installs the compiler and qemu; elsewhere the test is skipped without them.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "vlm" / "kernels"
CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
# the C files of the kernels proper (no Python): the paths, the portable reference, packing, the pool
SOURCES = ["matmul_portable.c", "attention_portable.c", "pack.c", "matmul.c", "attention.c", "pool.c",
           "matmul_neon.c", "matmul_neon_dot.c", "matmul_neon_i8mm.c", "attention_neon.c"]
ARM_FILES = ("matmul_neon", "attention_neon")
# CPU model -> the Arm paths it must report, best first
CPUS = {"max": "i8mm dotprod neon", "cortex-a76": "dotprod neon", "cortex-a72": "neon"}

pytestmark = pytest.mark.skipif(not (CC and QEMU), reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 "
                                "(Debian: apt-get install gcc-aarch64-linux-gnu qemu-user)")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arm")
    sources = [ROOT / "tests/arm/harness.c", *(KERNELS / s for s in SOURCES)]

    def compile_one(src: Path) -> subprocess.CompletedProcess:
        return subprocess.run([CC, "-O2", "-Wall", "-Wextra", "-pthread", f"-I{KERNELS}", "-c", str(src), "-o",
                               str(out / f"{src.stem}.o")], capture_output=True, text=True)

    # a file per core: the kernels take a minute to build one after another
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        builds = list(pool.map(compile_one, sources))
    stderr = "".join(b.stderr for b in builds)
    assert all(b.returncode == 0 for b in builds), stderr
    warnings = [line for line in stderr.splitlines() if "warning" in line and any(f in line for f in ARM_FILES)]
    assert not warnings, "\n".join(warnings)
    exe = out / "harness"
    subprocess.run([CC, "-static", "-pthread", *(str(out / f"{s.stem}.o") for s in sources), "-lm", "-o", str(exe)],
                   check=True)
    return exe


def test_arm_kernels_match_portable_on_every_cpu_model(harness):
    # the models run side by side; "quick": products only on each model's best path
    runs = {cpu: subprocess.Popen([QEMU, "-cpu", cpu, str(harness), "quick"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for cpu in CPUS}
    for cpu, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        assert f"paths: {CPUS[cpu]}\n" in out, f"{cpu}: {out}"
        assert proc.returncode == 0 and " 0 failures" in out, f"{cpu}:\n{out}"


def test_arm_files_are_empty_elsewhere():
    """On x86 the Arm files compile to no code at all (the x86 build is unchanged)."""
    host = shutil.which("cc") or shutil.which("gcc")
    if not host:
        pytest.skip("no host C compiler")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("checked on x86 hosts")
    for name in ("matmul_neon.c", "matmul_neon_dot.c", "matmul_neon_i8mm.c", "attention_neon.c"):
        asm = subprocess.run([host, "-O2", "-S", "-o", "-", str(KERNELS / name)], capture_output=True, text=True,
                             check=True).stdout
        assert not any(line.strip().startswith((".globl", ".type")) for line in asm.splitlines()), name
