import pytest
import torch

from lowbit.tensors import all_finite

CASES = [(dtype, bad) for dtype in (torch.float32, torch.float16, torch.bfloat16) for bad in ("nan", "inf", "-inf")]
# float8 e4m3fn has no infinity (a cast saturates to 448), only NaN; it has no min/max kernels either (float32 fallback)
CASES.append((torch.float8_e4m3fn, "nan"))


@pytest.mark.parametrize(("dtype", "bad"), CASES)
def test_all_finite_finds_any_nan_or_infinity(dtype, bad):
    values = torch.linspace(-3, 3, 257)
    assert all_finite(values.to(dtype))
    values[100] = float(bad)
    assert not all_finite(values.to(dtype))


def test_all_finite_on_views_empty_and_integer_tensors():
    matrix = torch.randn(8, 8)
    matrix[3, 5] = float("nan")
    assert all_finite(matrix[:, :5]) and not all_finite(matrix.mT)
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(4))
