"""lowbit's own checkpoints (quantize -> save) load into kernel modules with the same logits; generate runs."""

from __future__ import annotations

# tests/conftest.py sets TRITON_INTERPRET=1 (before triton is imported) on machines without a GPU;
# with one, these tests run the compiled kernels.
import pytest  # noqa: E402
import torch  # noqa: E402

import lowbit  # noqa: E402
from conftest import calibration_ids, make_model_folder, tiny_model  # noqa: E402
from lowbit.kernels.checkpoint import load_quantized  # noqa: E402
from lowbit.kernels.linear import WNA16Linear  # noqa: E402
from lowbit.kernels.runtime import generate  # noqa: E402

SCHEMES = {
    "w4-sym-g32": {"weights.bits": 4, "weights.symmetric": True, "weights.group_size": 32},
    "w4-asym-g32": {"weights.bits": 4, "weights.symmetric": False, "weights.group_size": 32},
    "w8-sym-channel": {"weights.bits": 8, "weights.symmetric": True, "weights.group_size": -1},
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_lowbit_checkpoint_loads_into_kernel_modules(scheme: str, tmp_path) -> None:
    model = tiny_model("llama")
    ids = calibration_ids(vocab=model.config.vocab_size)
    quantized = lowbit.quantize(
        model, lowbit.Recipe(method="rtn").updated(**SCHEMES[scheme]), ids, progress=False
    )
    with torch.no_grad():
        expected = quantized.model(ids).logits
    out = lowbit.save(quantized, tmp_path / "out")
    loaded, _ = load_quantized(out, device="cpu", dtype=torch.float32)
    assert sum(isinstance(m, WNA16Linear) for m in loaded.modules()) == 14
    with torch.no_grad():
        got = loaded(ids[:2]).logits
    assert float((got - expected[:2]).norm() / expected[:2].norm()) < 1e-4


def test_generate_from_folder(tmp_path, tokenizer_folder) -> None:
    folder = make_model_folder(tmp_path, "llama", tokenizer_folder)
    text, result = generate(str(folder), "the a of and", max_new_tokens=5, device="cpu", use_cuda_graph=False)
    assert isinstance(text, str)
    assert result.tokens.shape == (1, 5) and result.tokens_per_second > 0
