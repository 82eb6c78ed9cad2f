import os
import string
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one BLAS thread for MLX too (machine.load_fast_blas reads it; child processes inherit it):
# pytest-xdist runs a worker per core, and spinning OpenBLAS workers beside another busy
# process make small matmuls ~10x slower
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

TWINS = ["torch", "mlx"]  # parametrize a test over both frameworks: @pytest.mark.parametrize("framework", TWINS)


def pytest_configure(config):
    # The test models are tiny: a second intra-op thread buys nothing, and where another
    # process shares the 2 cores, spinning OpenMP workers made single tests 10-50x slower.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct as a cached HF directory (converted on first use)."""
    import machine

    return machine.resolve_model(machine.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded model's real tokenizer, without converting its weights."""
    import machine
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(machine.embedded_tokenizer_dir())


def tiny_llama(vocab_size=64, seed=0, **overrides):
    """A random 2-layer Llama built from a config in-process (milliseconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    config = LlamaConfig(**{**settings, **overrides})
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as an HF directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(vocab_size=len(smollm2_tokenizer)).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def char_model_dir(tmp_path_factory):
    """A tiny random Llama with a character-level tokenizer (~100 tokens): fast, and a
    single character is a single action, so a reward on one character is learnable."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                        unk_token="<unk>")
    path = tmp_path_factory.mktemp("char-model")
    tiny_llama(vocab_size=len(vocab), max_position_embeddings=1024, pad_token_id=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
