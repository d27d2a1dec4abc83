"""clear_vector_registers: a thread's memmove registers keep the last 512-byte copy (a 128-d float32 template) until
cleared. Read with gdb from a child process's live thread; skipped where gdb or AVX-512 registers are missing, or
where this machine's memmove leaves no copy to clear (the control case)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_CHILD = r"""
import ctypes, sys, threading, time
import numpy as np
from advface.encrypted.memory import clear_vector_registers

secret = np.random.default_rng(20).standard_normal(128).astype(np.float32)
copy = np.empty_like(secret)
done = threading.Event()

def work():
    ctypes.memmove(copy.ctypes.data, secret.ctypes.data, secret.nbytes)  # memcpy of a template, as numpy does
    if sys.argv[1] == "1":
        clear_vector_registers()
    done.set()
    threading.Event().wait()

threading.Thread(target=work, daemon=True).start()
done.wait()
print("ready", flush=True)
time.sleep(600)
"""


def _register_words(clear: bool) -> set[int]:
    """Every 64-bit word of every thread's zmm0-zmm31 registers in the child, after its worker thread copied the
    secret (and, with ``clear``, cleared its registers)."""
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "1" if clear else "0"], stdout=subprocess.PIPE, text=True, cwd=root
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        commands = [arg for i in range(32) for arg in ("-ex", f"thread apply all p/x $zmm{i}.v8_int64")]
        out = subprocess.run(
            ["gdb", "-p", str(child.pid), "-batch", *commands], capture_output=True, text=True, timeout=120
        ).stdout
    finally:
        child.kill()
        child.wait()
    words: set[int] = set()
    for values in re.findall(r"^\$\d+ = \{(.*)\}$", out, flags=re.MULTILINE):
        words.update(int(w, 16) for w in values.split(", "))
    if not words:
        pytest.skip("gdb could not read zmm registers (no AVX-512, or ptrace not allowed)")
    return words


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("gdb") is None, reason="needs Linux and gdb")
def test_clear_vector_registers_leaves_no_copy_of_the_last_template_in_registers() -> None:
    secret = np.random.default_rng(20).standard_normal(128).astype(np.float32)
    wanted = set(secret.view(np.uint64).tolist())
    if not wanted & _register_words(clear=False):
        pytest.skip("this machine's memmove left no copy of the template in registers (nothing to clear)")
    assert not wanted & _register_words(clear=True)
