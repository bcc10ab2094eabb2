import math

import pytest
import torch

from lowbit.formats.hadamard import (
    _small_factor,
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard_matrix,
    random_signs,
)

# Sizes of the models lowbit targets -> (small factor order, construction, q). Pinned: a checkpoint with an
# online transform baked into its weights needs the same matrix forever.
PINNED = {
    64: (1, "sylvester", 0),
    128: (1, "sylvester", 0),
    576: (36, "paley2", 17),  # SmolLM2-135M hidden
    1536: (12, "paley1", 11),  # SmolLM2-135M intermediate, Qwen2.5-1.5B hidden
    2048: (1, "sylvester", 0),
    4096: (1, "sylvester", 0),
    5632: (44, "paley1", 43),  # TinyLlama intermediate
    8192: (1, "sylvester", 0),
    11008: (344, "paley1", 343),  # Llama-2-7B intermediate: GF(7^3)
    14336: (28, "paley2", 13),  # Llama-3-8B / Mistral-7B intermediate
    28672: (28, "paley2", 13),  # Llama-3-70B intermediate
    4864: (76, "paley2", 37),  # Qwen2.5-0.5B intermediate
    896: (28, "paley2", 13),  # Qwen2.5-0.5B hidden
    18944: (148, "paley2", 73),  # Qwen2.5-7B intermediate
}
SMALL = [1, 2, 4, 12, 20, 28, 36, 52, 100, 64, 576, 1536, 2048]  # 52: GF(5^2), 100: GF(7^2)


@pytest.mark.parametrize("n", sorted(PINNED))
def test_model_sizes_use_the_pinned_construction(n):
    factors = hadamard_factors(n)
    assert (factors.small_order, factors.construction, factors.q) == PINNED[n]
    assert factors.small_order * factors.power_of_two == n
    assert factors.power_of_two & (factors.power_of_two - 1) == 0


@pytest.mark.parametrize(
    ("order", "construction", "q"),
    sorted({v for v in PINNED.values() if v[0] > 1})
    + [(28, "paley1", 27), (52, "paley2", 25), (20, "paley2", 9)],
)
def test_paley_factors_are_hadamard_matrices(order, construction, q):
    small = _small_factor(order, construction, q)
    assert set(small.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(small @ small.T, order * torch.eye(order))


@pytest.mark.parametrize("n", SMALL)
def test_hadamard_matrix_is_orthonormal_and_equals_the_fast_transform(n):
    matrix = hadamard_matrix(n, torch.float64)
    assert torch.allclose(matrix @ matrix.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(matrix.abs(), torch.full_like(matrix, 1 / math.sqrt(n)))
    # the transform of the identity is the matrix itself, entry for entry
    assert torch.allclose(hadamard_transform(torch.eye(n, dtype=torch.float64)), matrix, atol=1e-12)
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(hadamard_transform(x), x @ matrix.float(), atol=1e-5)


@pytest.mark.parametrize("n", sorted(PINNED))
def test_fast_transform_is_orthonormal_at_every_model_size(n):
    # H is too big to build at 28672 (3.3 GB): check rows of H (transforms of basis vectors) and that the
    # transform keeps inner products, which only an orthogonal map does.
    generator = torch.Generator().manual_seed(0)
    basis = torch.zeros(4, n, dtype=torch.float64)
    basis[torch.arange(4), torch.randint(0, n, (4,), generator=generator)] = 1.0
    rows = hadamard_transform(basis)
    assert torch.allclose(rows.abs(), torch.full_like(rows, 1 / math.sqrt(n)), atol=1e-12)
    x = torch.randn(8, n, dtype=torch.float64, generator=generator)
    y = hadamard_transform(x)
    assert torch.allclose(y @ y.T, x @ x.T, rtol=1e-10, atol=1e-8)


def test_transform_keeps_the_input_dtype_and_leaves_the_input_alone():
    x = torch.randn(4, 1536, dtype=torch.bfloat16)
    before = x.clone()
    y = hadamard_transform(x)
    assert y.dtype == torch.bfloat16 and torch.equal(x, before)
    exact = hadamard_transform(x.double())
    assert float((y.double() - exact).norm() / exact.norm()) < 1e-2
    single = torch.randn(12)
    assert torch.allclose(hadamard_transform(single), single @ hadamard_matrix(12), atol=1e-6)


def test_transform_is_differentiable():
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hadamard_transform, (x,))


def test_random_hadamard_is_orthonormal_deterministic_and_seeded():
    a, again, other = (random_hadamard_matrix(576, seed) for seed in (0, 0, 1))
    assert torch.allclose(a @ a.T, torch.eye(576), atol=1e-5)
    assert torch.equal(a, again) and not torch.equal(a, other)
    x = torch.randn(5, 576)
    assert torch.allclose(x @ a, hadamard_transform(x) * random_signs(576, 0), atol=1e-5)


@pytest.mark.parametrize(("n", "neighbours"), [(92, "88 and 96"), (6, "4 and 8"), (7, "4 and 8")])
def test_unsupported_sizes_say_what_exists_and_what_to_do(n, neighbours):
    with pytest.raises(ValueError, match=f"no Hadamard matrix of order {n} ") as error:
        hadamard_matrix(n)
    assert f"nearest supported orders are {neighbours}" in str(error.value)
    assert "online_down_proj=False" in str(error.value)
    with pytest.raises(ValueError, match=f"order {n}"):
        hadamard_transform(torch.zeros(2, n))
