"""Orthonormal Hadamard matrices and the fast transform, for rotating weights and activations.

A Hadamard matrix of order ``n`` has entries ±1 and ``H H^T = n I``; lowbit always uses the orthonormal
scaling ``H / sqrt(n)``. Order ``n = m * 2^a`` is built as the Kronecker product ``H_m ⊗ S_(2^a)`` of one
"small" factor ``H_m`` and a Sylvester matrix ``S`` (Sylvester, 1867: ``S_(2k) = [[S_k, S_k], [S_k, -S_k]]``).
The small factor comes from Paley's constructions (R. E. A. C. Paley, "On orthogonal matrices", J. Math.
Phys. 12, 1933), with ``q`` an odd prime power and ``chi`` the quadratic character of GF(q):

- Paley I, ``m = q + 1`` for ``q ≡ 3 (mod 4)``: ``H = I + S``, ``S = [[0, 1^T], [-1, Q]]``;
- Paley II, ``m = 2(q + 1)`` for ``q ≡ 1 (mod 4)``: ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]``,
  ``C = [[0, 1^T], [1, Q]]``;

where ``Q[a, b] = chi(a - b)`` is the Jacobsthal matrix. For each order the smallest ``m`` that works is used,
and among equal ``m`` a prime ``q`` before a prime power and Paley I before Paley II. This choice is part of
the checkpoint format (an online transform baked into a weight must be re-applied with the same matrix), so it
must never change; ``tests/formats/test_hadamard.py`` pins it.

``hadamard_transform`` applies ``x -> x @ H`` along the last dimension without building ``H``: the fast
Walsh–Hadamard butterfly for the Sylvester factor (``a`` steps of ``n`` additions) and a dense ``m x m``
matmul for the small factor, as QuaRot does (Ashkboos et al. 2024, https://arxiv.org/abs/2404.00456).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HadamardFactors:
    """How the order ``size = small_order * power_of_two`` is built (see the module docstring)."""

    size: int
    small_order: int  # m: 1 (pure Sylvester) or a Paley order
    power_of_two: int  # 2^a
    construction: str  # "sylvester", "paley1" or "paley2"
    q: int  # the prime power of the Paley construction; 0 for "sylvester"


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k`` and ``p`` prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _paley_choice(m: int) -> tuple[str, int] | None:
    """The Paley construction of order ``m`` (``("paley1" | "paley2", q)``), or None if there is none."""
    candidates = []
    if m % 4 == 0 and (found := _prime_power(m - 1)) and (m - 1) % 4 == 3:
        candidates.append((found[1] > 1, 0, "paley1", m - 1))
    if m % 4 == 0 and (found := _prime_power(m // 2 - 1)) and (m // 2 - 1) % 4 == 1:
        candidates.append((found[1] > 1, 1, "paley2", m // 2 - 1))
    if not candidates:
        return None
    _, _, construction, q = min(candidates)
    return construction, q


def _factors_or_none(n: int) -> HadamardFactors | None:
    if n < 1:
        return None
    power = n & -n
    odd = n // power
    if odd == 1:
        return HadamardFactors(n, 1, n, "sylvester", 0)
    shift = 1
    while shift <= power:
        m = odd * shift
        if (choice := _paley_choice(m)) is not None:
            return HadamardFactors(n, m, n // m, *choice)
        shift *= 2
    return None


def supported_neighbours(n: int, limit: int = 4096) -> tuple[int | None, int | None]:
    """The nearest orders below and above ``n`` that ``hadamard_matrix`` can build (None if not within ``limit``)."""
    below = next((k for k in range(n - 1, max(n - limit, 0), -1) if _factors_or_none(k)), None)
    above = next((k for k in range(n + 1, n + limit) if _factors_or_none(k)), None)
    return below, above


def hadamard_factors(n: int) -> HadamardFactors:
    """The construction of the order-``n`` Hadamard matrix, or a ValueError saying which orders exist."""
    found = _factors_or_none(n)
    if found is None:
        below, above = supported_neighbours(n)
        raise ValueError(
            f"no Hadamard matrix of order {n} can be built: lowbit builds orders m * 2^a where m is 1 or a Paley "
            "order (q + 1 for a prime power q ≡ 3 mod 4, e.g. 12, 20, 24, 28, 44; 2(q + 1) for q ≡ 1 mod 4, e.g. "
            f"36, 52, 60); the nearest supported orders are {below} and {above}. A Hadamard rotation needs this "
            "size to be supported: for an intermediate (MLP) size, turn off the online down_proj rotation "
            "(online_down_proj=False); for the hidden size or head dimension, quantize this model without rotation."
        )
    return found


def _field_tables(q: int) -> tuple[Tensor, Tensor]:
    """For GF(q), elements coded as integers ``0..q-1`` (base-p digits = polynomial coefficients): the table
    ``diff[a, b] = code(a - b)`` (``[q, q]`` int64) and the quadratic character ``chi`` (``[q]`` float32)."""
    p, k = _prime_power(q) or (0, 0)
    if p < 3:
        raise ValueError(f"Paley constructions need an odd prime power, got {q}")
    modulus = _irreducible_polynomial(p, k)
    digits = torch.tensor([[(e // p**i) % p for i in range(k)] for e in range(q)], dtype=torch.int64)
    weights = torch.tensor([p**i for i in range(k)], dtype=torch.int64)
    diff = ((digits[:, None, :] - digits[None, :, :]) % p * weights).sum(-1)
    squares = {_encode(_mul_mod(d, d, modulus, p), p) for d in digits.tolist()[1:]}
    chi = torch.tensor([0.0] + [1.0 if e in squares else -1.0 for e in range(1, q)])
    return diff, chi


def _encode(coefficients: list[int], p: int) -> int:
    return sum(c * p**i for i, c in enumerate(coefficients))


def _mul_mod(a: list[int], b: list[int], modulus: list[int], p: int) -> list[int]:
    """``a * b mod modulus`` over GF(p); polynomials as coefficient lists, lowest degree first, modulus monic."""
    k = len(modulus) - 1
    product = [0] * (2 * k - 1)
    for i, j in itertools.product(range(k), range(k)):
        product[i + j] = (product[i + j] + a[i] * b[j]) % p
    return _rem(product, modulus, p)[:k]


def _rem(a: list[int], modulus: list[int], p: int) -> list[int]:
    """``a mod modulus`` over GF(p) for a monic ``modulus``; the result padded to ``len(a)``."""
    a = list(a)
    k = len(modulus) - 1
    for top in range(len(a) - 1, k - 1, -1):
        c = a[top]
        if c:
            for i in range(k + 1):
                a[top - k + i] = (a[top - k + i] - c * modulus[i]) % p
    return a


def _irreducible_polynomial(p: int, k: int) -> list[int]:
    """The first monic degree-``k`` polynomial over GF(p) (lexicographic in its lower coefficients) that no
    monic polynomial of degree ``1..k//2`` divides."""
    for lower in itertools.product(range(p), repeat=k):
        candidate = [*lower, 1]
        divisible = any(
            not any(_rem(candidate, [*g, 1], p)[:d])
            for d in range(1, k // 2 + 1)
            for g in itertools.product(range(p), repeat=d)
        )
        if not divisible:
            return candidate
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


@functools.lru_cache(maxsize=64)
def _small_factor(m: int, construction: str, q: int) -> Tensor:
    """The ±1 Paley matrix of order ``m`` (float32, CPU, not normalised). Cached: do not modify it."""
    diff, chi = _field_tables(q)
    jacobsthal = chi[diff]
    ones = torch.ones(q)
    if construction == "paley1":
        skew = torch.zeros(m, m)
        skew[0, 1:], skew[1:, 0], skew[1:, 1:] = ones, -ones, jacobsthal
        return torch.eye(m) + skew
    conference = torch.zeros(q + 1, q + 1)
    conference[0, 1:], conference[1:, 0], conference[1:, 1:] = ones, ones, jacobsthal
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1), zero_block)


@functools.lru_cache(maxsize=64)
def _small_factor_on(m: int, construction: str, q: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The orthonormal small factor ``H_m / sqrt(m)`` on ``device`` (cached per device and dtype)."""
    return (_small_factor(m, construction, q).double() / math.sqrt(m)).to(device=device, dtype=dtype)


def _sylvester(n: int) -> Tensor:
    matrix = torch.ones(1, 1)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    while matrix.shape[0] < n:
        matrix = torch.kron(plus, matrix)
    return matrix


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """The orthonormal Hadamard matrix of order ``n``, ``[n, n]`` with ``H @ H.T = I`` (entries ±1/sqrt(n)).

    Built as ``H_m ⊗ S_(2^a) / sqrt(n)`` (see the module docstring). This materialises ``n^2`` entries: to
    apply it to activations or weights use ``hadamard_transform``. Raises ValueError for orders it cannot
    build, naming the nearest supported ones.
    """
    factors = hadamard_factors(n)
    sylvester = _sylvester(factors.power_of_two)
    if factors.small_order > 1:
        sylvester = torch.kron(_small_factor(factors.small_order, factors.construction, factors.q), sylvester)
    return (sylvester.double() / math.sqrt(n)).to(dtype=dtype, device=device)


def random_signs(n: int, seed: int, device: torch.device | str | None = None) -> Tensor:
    """``n`` random ±1 (float32), a deterministic function of ``seed`` (a CPU ``torch.Generator``)."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    return signs.to(device)


def random_hadamard_matrix(
    n: int, seed: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """``H @ diag(s)`` with ``s = random_signs(n, seed)``: orthonormal, a different rotation per seed (QuaRot's
    randomized Hadamard, https://arxiv.org/abs/2404.00456). ``x @ random_hadamard_matrix(n, seed)`` equals
    ``hadamard_transform(x) * random_signs(n, seed)``."""
    return (hadamard_matrix(n, torch.float64) * random_signs(n, seed).double()).to(dtype=dtype, device=device)


def _butterfly(columns: Tensor, small_order: int, power_of_two: int) -> Tensor:
    """``S^T X`` along the power-of-two axis of ``columns`` (``[m * 2^a, rows]``, viewed as ``[m, 2^a, rows]``)
    for the symmetric, not normalised Sylvester matrix ``S``: ``a`` steps of sums and differences.

    The transformed axis is first and the rows last, so every step is two contiguous vector operations. Without
    autograd the steps alternate between two buffers; with it they stack new tensors.
    """
    rows = columns.shape[-1]
    track = columns.requires_grad and torch.is_grad_enabled()
    scratch = None if track else torch.empty_like(columns)
    half = 1
    while half < power_of_two:
        shape = (small_order, power_of_two // (2 * half), 2, half, rows)
        pairs = columns.view(shape)
        first, second = pairs[:, :, 0], pairs[:, :, 1]
        if scratch is None:
            columns = torch.stack((first + second, first - second), dim=2).view(columns.shape)
        else:
            target = scratch.view(shape)
            torch.add(first, second, out=target[:, :, 0])
            torch.sub(first, second, out=target[:, :, 1])
            columns, scratch = scratch, columns
        half *= 2
    return columns


def hadamard_transform(x: Tensor, factors: HadamardFactors | None = None) -> Tensor:
    """``x @ hadamard_matrix(n)`` along the last dimension of ``x`` (size ``n``), without building the matrix.

    x: any shape ``[..., n]``; computed in float32 (float64 stays float64), returned in ``x.dtype``; ``x``
    itself is never modified. Differentiable.
    factors: ``hadamard_factors(n)``, to skip the look-up in hot loops; by default that of ``x.shape[-1]``.

    With ``x`` viewed as blocks ``X`` ``[m, 2^a]``, ``x @ (H_m ⊗ S) = H_m^T X S``: the butterfly for ``S``,
    then one ``[m, m]`` matmul for ``H_m``, costing ``n (a + m)`` multiply-adds per row.
    """
    n = x.shape[-1]
    factors = factors or hadamard_factors(n)
    if factors.size != n:
        raise ValueError(
            f"the Hadamard transform is of order {factors.size}, but the input's last dim is {n}"
        )
    compute = torch.promote_types(x.dtype, torch.float32)
    columns = x.reshape(-1, n).T.to(compute, memory_format=torch.contiguous_format, copy=True)  # [n, rows]
    rows = columns.shape[1]
    columns = _butterfly(columns, factors.small_order, factors.power_of_two)
    if factors.small_order > 1:
        small = _small_factor_on(
            factors.small_order, factors.construction, factors.q, columns.device, compute
        )
        columns = (small.T @ columns.view(factors.small_order, -1)).view(n, rows)
    return (columns.T / math.sqrt(factors.power_of_two)).reshape(x.shape).to(x.dtype)
