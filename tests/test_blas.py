"""machine.load_fast_blas: MLX on Linux CPU runs its matmuls in OpenBLAS, not in the wheel's
reference BLAS. Each check runs in a fresh interpreter: the swap must happen before mlx.core
is imported, and a library once loaded stays for the life of the process."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "nanoalign: could not load an optimized BLAS for MLX ("

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="only Linux swaps MLX's BLAS")

MATMUL = """
import numpy as np
import machine
lib = machine.load_fast_blas({cache!r})
assert machine.load_fast_blas({cache!r}) == lib  # idempotent
import mlx.core as mx
a = mx.random.normal((64, 64))
assert np.allclose(np.array(a @ a), np.array(a) @ np.array(a), atol=1e-4)
print(lib)
print(lib is not None and lib in open("/proc/self/maps").read())
"""


def python(code, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def run(code):
    """stdout lines and stderr of code run in a fresh interpreter at the repo root."""
    proc = python(code)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out.splitlines(), err


def test_mlx_matmul_runs_in_the_loaded_library(tmp_path):
    (lib, mapped), err = run(MATMUL.format(cache=str(tmp_path)))
    assert lib.startswith(str(tmp_path / "blas")) and mapped == "True", err
    assert WARNING not in err


def test_too_late_after_mlx_import_warns_once_and_returns_none(tmp_path):
    (lib,), err = run(f"import mlx.core, machine; print(machine.load_fast_blas({str(tmp_path)!r}))")
    assert lib == "None"
    assert err.count(WARNING) == 1 and "too late" in err
    assert not (tmp_path / "blas").exists()


def test_second_process_reuses_the_cache(tmp_path):
    (lib, _), _ = run(MATMUL.format(cache=str(tmp_path)))
    before = os.stat(lib)
    (lib_again, mapped), err = run(MATMUL.format(cache=str(tmp_path)))
    after = os.stat(lib_again)
    assert lib_again == lib and mapped == "True", err
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_concurrent_first_calls_share_one_copy(tmp_path):
    procs = [python(MATMUL.format(cache=str(tmp_path))) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    libs = {out.splitlines()[0] for out, _ in outs}
    assert len(libs) == 1 and all(out.splitlines()[1] == "True" for out, _ in outs)
    assert [p.name for p in (tmp_path / "blas").iterdir()] == [os.path.basename(os.path.dirname(libs.pop()))]
