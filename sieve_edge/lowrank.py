"""Low-rank factorizations of one linear matrix, W ≈ B·A, in float64 (docs/ARCHITECTURE.md, "The math").

Pure functions on tensors: no modules, no I/O, no imports from the rest of the package.
Shapes: W is (m, n) = (out, in); C = X Xᵀ / N is the (n, n) input covariance of the task's
calibration tokens; B is (m, r), A is (r, n).

Every method decomposes once into a `Decomposition`; truncating to any rank is then a
slice, which is what makes a per-matrix search affordable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("svd", "input-pca", "output", "sieve")


def breakeven_rank(m: int, n: int) -> float:
    """The rank at which a pair costs as many parameters as the dense matrix: r(m+n) = mn."""
    return m * n / (m + n)


def round_rank(r: float, multiple: int = 8) -> int:
    """Nearest multiple of `multiple` (at least one multiple), so CPU kernels stay fast."""
    return max(multiple, multiple * int(round(r / multiple)))


def rank_for_keep(m: int, n: int, keep: float, multiple: int = 8) -> int | None:
    """Rank whose pair keeps about `keep` of the dense parameters, or None to stay dense.

    None when keep ≥ 1 or when the rounded rank would not save parameters.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if keep >= 1.0:
        return None
    r = min(round_rank(keep * breakeven_rank(m, n), multiple), min(m, n))
    return None if r * (m + n) >= m * n else r


def keep_of_rank(m: int, n: int, rank: int | None) -> float:
    """Fraction of the dense parameters a rank-r pair keeps (1.0 for dense)."""
    return 1.0 if rank is None else rank * (m + n) / (m * n)


@dataclass
class Decomposition:
    """W ≈ left[:, :r] @ right[:r] for every r ≤ max_rank.

    `energy[j]` is what direction j contributes to the method's objective and `total` the
    objective's value at rank 0, so `error(r)` is the relative error left at rank r with no
    extra work: ‖W X − B A X‖² / ‖W X‖² for `output`, `input-pca` and `sieve` (the latter
    on the corrected inputs), ‖W − B A‖² / ‖W‖² for `svd`.
    """

    left: torch.Tensor    # (m, k)
    right: torch.Tensor   # (k, n)
    energy: torch.Tensor  # (k,)
    total: float
    method: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    @property
    def max_rank(self) -> int:
        return self.left.shape[1]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 < rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 1..{self.max_rank} for a {self.shape} matrix")
        return self.left[:, :rank], self.right[:rank]

    def error(self, rank: int | None) -> float:
        if rank is None or self.total <= 0:
            return 0.0
        kept = float(self.energy[: min(rank, self.max_rank)].sum())
        return max(0.0, (self.total - kept) / self.total)

    def truncated(self, max_rank: int) -> "Decomposition":
        k = min(max_rank, self.max_rank)
        return Decomposition(self.left[:, :k].clone(), self.right[:k].clone(), self.energy[:k].clone(),
                             self.total, self.method)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _psd_sqrt_basis(C: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = C for a symmetric PSD C: Q Λ^½ from its eigendecomposition (n, n).

    Eigendecomposition rather than Cholesky: calibration covariances are often rank
    deficient (fewer tokens than dimensions, dead channels).
    """
    C = (C + C.T) / 2
    evals, evecs = torch.linalg.eigh(C)
    return evecs * evals.clamp_min(0).sqrt()


def _check(W: torch.Tensor, C: torch.Tensor | None, name: str) -> None:
    if W.dim() != 2:
        raise ValueError(f"{name}: W must be 2-D (out, in), got shape {tuple(W.shape)}")
    if C is not None and C.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"{name}: C must be ({W.shape[1]}, {W.shape[1]}) for W {tuple(W.shape)}, got {tuple(C.shape)}")


def decompose_svd(W: torch.Tensor, max_rank: int | None = None) -> Decomposition:
    """Truncated SVD of the weights alone (the data-blind baseline)."""
    _check(W, None, "svd")
    W = _f64(W)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = min(max_rank or S.numel(), S.numel())
    return Decomposition(U[:, :k] * S[:k], Vh[:k].contiguous(), S[:k] ** 2, float((S**2).sum()), "svd")


def decompose_input_pca(W: torch.Tensor, C: torch.Tensor, max_rank: int | None = None) -> Decomposition:
    """Project the inputs on the top principal directions of C: A = V_rᵀ, B = W V_r."""
    _check(W, C, "input-pca")
    W, C = _f64(W), _f64(C)
    evals, evecs = torch.linalg.eigh((C + C.T) / 2)
    order = torch.argsort(evals, descending=True)
    V = evecs[:, order]                                     # (n, n)
    lam = evals[order].clamp_min(0)
    WV = W @ V                                              # (m, n)
    energy = lam * (WV**2).sum(0)                           # output energy of each input direction
    k = min(max_rank or V.shape[1], V.shape[1])
    return Decomposition(WV[:, :k].contiguous(), V[:, :k].T.contiguous(), energy[:k], float(energy.sum()), "input-pca")


def whitening(C: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = C (float64). Compute once per input covariance and share it between the
    matrices that read the same input (q/k/v, gate/up)."""
    return _psd_sqrt_basis(_f64(C))


def _output_aligned(W: torch.Tensor, L: torch.Tensor, max_rank: int | None, method: str) -> Decomposition:
    # U_r: top-r eigenvectors of W C Wᵀ = left singular vectors of W L (L Lᵀ = C), which
    # avoids forming the (m, m) matrix. B = U_r, A = U_rᵀ W.
    M = W @ L                                               # (m, n)
    U, S, _ = torch.linalg.svd(M, full_matrices=False)      # U (m, min(m, n))
    k = min(max_rank or U.shape[1], U.shape[1])
    Uk = U[:, :k].contiguous()
    return Decomposition(Uk, Uk.T @ W, S[:k] ** 2, float((S**2).sum()), method)


def decompose_output(W: torch.Tensor, C: torch.Tensor, max_rank: int | None = None,
                     L: torch.Tensor | None = None) -> Decomposition:
    """Joint (output-aligned) projection: the Eckart-Young optimum of ‖W X − W' X‖."""
    _check(W, C, "output")
    return _output_aligned(_f64(W), whitening(C) if L is None else L, max_rank, "output")


@dataclass
class SieveStats:
    """What every matrix reading the same corrected input shares: T = (C_hat + λI)⁻¹ C_crossᵀ
    (so W_ls = W Tᵀ) and the whitening L of C_hat."""

    T: torch.Tensor  # (n, n)
    L: torch.Tensor  # (n, n)


def sieve_stats(C_hat: torch.Tensor, C_cross: torch.Tensor, damp: float = 1e-4) -> SieveStats:
    """C_hat = X̂ X̂ᵀ / N, C_cross = X X̂ᵀ / N (both (n, n)); λ = damp · mean(diag C_hat) keeps
    the solve stable when X̂ is rank deficient."""
    C_hat, C_cross = _f64(C_hat), _f64(C_cross)
    C_hat = (C_hat + C_hat.T) / 2
    lam = damp * float(C_hat.diagonal().mean().clamp_min(1e-12))
    reg = C_hat + lam * torch.eye(C_hat.shape[0], dtype=C_hat.dtype, device=C_hat.device)
    return SieveStats(torch.linalg.solve(reg, C_cross.T), _psd_sqrt_basis(C_hat))


def decompose_sieve(
    W: torch.Tensor,
    C_hat: torch.Tensor | None = None,
    C_cross: torch.Tensor | None = None,
    *,
    damp: float = 1e-4,
    max_rank: int | None = None,
    stats: SieveStats | None = None,
) -> Decomposition:
    """Error-correcting fit: inputs X̂ from the already factorized upstream, targets W X.

    W_ls = W C_cross (C_hat + λI)⁻¹ is the least-squares map from X̂ to W X; `output` on
    (W_ls, C_hat) then gives the best rank-r map, since ‖WX − M X̂‖² = ‖WX − W_ls X̂‖² +
    ‖(W_ls − M) X̂‖² for any M. Pass `stats` (from `sieve_stats`) to share the solve.
    """
    if stats is None:
        if C_hat is None or C_cross is None:
            raise ValueError("sieve: give C_hat and C_cross, or precomputed stats")
        _check(W, C_hat, "sieve")
        _check(W, C_cross, "sieve")
        stats = sieve_stats(C_hat, C_cross, damp)
    elif stats.T.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"sieve: stats are for inputs of size {stats.T.shape[0]}, W is {tuple(W.shape)}")
    W_ls = _f64(W) @ stats.T.T
    return _output_aligned(W_ls, stats.L, max_rank, "sieve")


def decompose(W: torch.Tensor, C: torch.Tensor | None = None, method: str = "output",
              max_rank: int | None = None, L: torch.Tensor | None = None) -> Decomposition:
    """One entry point for the methods that need only W and the dense input covariance."""
    if method == "svd":
        return decompose_svd(W, max_rank)
    if C is None:
        raise ValueError(f"method '{method}' needs the input covariance C")
    if method == "input-pca":
        return decompose_input_pca(W, C, max_rank)
    if method == "output":
        return decompose_output(W, C, max_rank, L)
    if method == "sieve":
        raise ValueError("method 'sieve' needs the corrected-input statistics: use decompose_sieve")
    raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")


def output_error(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, C: torch.Tensor) -> float:
    """Relative calibration output error ‖(W − B A) X‖² / ‖W X‖² = tr(E C Eᵀ) / tr(W C Wᵀ)."""
    W, B, A, C = _f64(W), _f64(B), _f64(A), _f64(C)
    E = W - B @ A
    denom = float(torch.einsum("ij,jk,ik->", W, C, W))
    return float(torch.einsum("ij,jk,ik->", E, C, E)) / denom if denom > 0 else 0.0


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio of an approximation, in dB (inf when exact)."""
    noise = float(((reference - approx).double() ** 2).sum())
    signal = float((reference.double() ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)
