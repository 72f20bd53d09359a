"""float64 math of the four methods, against cases worked by hand and random correlated data."""
import math

import pytest
import torch

from sieve_edge.lowrank import (breakeven_rank, decompose, decompose_sieve, keep_of_rank, output_error,
                                rank_for_keep, round_rank, snr_db)



@pytest.fixture(autouse=True)
def float64_default():
    """The math is float64; restore the default so other test files see float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def correlated(n, N, seed=0):
    """X (n, N) with a decaying spectrum and correlated coordinates, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * (0.7 ** torch.arange(n))  # column j scaled 0.7^j
    return mix @ torch.randn(n, N, generator=g)


def cov(X):
    return X @ X.T / X.shape[1]


def test_hand_case_output_keeps_the_direction_the_data_uses():
    # W = diag(3, 2, 1); the task's inputs live almost only on coordinate 2.
    W = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    C = torch.diag(torch.tensor([1.0, 100.0, 1.0]))
    B, A = decompose(W, None, "svd").factors(1)
    assert torch.allclose(B @ A, torch.diag(torch.tensor([3.0, 0.0, 0.0])))
    B, A = decompose(W, C, "output").factors(1)
    assert torch.allclose(B @ A, torch.diag(torch.tensor([0.0, 2.0, 0.0])))
    # output error: energies are 9, 400, 1 → keeping 400 leaves 10/410
    assert decompose(W, C, "output").error(1) == pytest.approx(10 / 410)
    assert output_error(W, B, A, C) == pytest.approx(10 / 410)


@pytest.mark.parametrize("method", ["svd", "input-pca", "output"])
def test_exact_reconstruction_at_full_rank(method):
    m, n = 12, 8
    W = torch.randn(m, n)
    C = cov(torch.randn(n, 200))
    B, A = decompose(W, C, method).factors(n)
    assert torch.allclose(B @ A, W, atol=1e-10)
    assert decompose(W, C, method).error(n) == pytest.approx(0.0, abs=1e-12)


def test_sieve_full_rank_recovers_w_when_inputs_are_clean():
    W = torch.randn(10, 6)
    C = cov(correlated(6, 500))
    B, A = decompose_sieve(W, C, C, damp=1e-12).factors(6)
    assert snr_db(W, B @ A) > 100


def test_output_beats_svd_and_input_pca_at_every_rank():
    m, n = 24, 16
    W = torch.randn(m, n)
    C = cov(correlated(n, 2000))
    decs = {meth: decompose(W, C, meth) for meth in ("svd", "input-pca", "output")}
    for r in range(1, n + 1):
        err = {meth: output_error(W, *d.factors(r), C) for meth, d in decs.items()}
        assert err["output"] <= err["svd"] + 1e-12, (r, err)
        assert err["output"] <= err["input-pca"] + 1e-12, (r, err)
        # the free spectrum estimate is the real error for the data-aware methods
        assert decs["output"].error(r) == pytest.approx(err["output"], abs=1e-9)
        assert decs["input-pca"].error(r) == pytest.approx(err["input-pca"], abs=1e-9)


def test_sieve_beats_output_through_a_stack_of_layers():
    # Three layers with a nonlinearity between: x -> tanh(W1 x) -> tanh(W2 .) -> W3 .
    torch.manual_seed(0)
    n, N, r = 16, 3000, 4
    Ws = [torch.randn(n, n) / math.sqrt(n) * 2 for _ in range(3)]
    X = correlated(n, N, seed=1)

    def forward(mats, X):
        h = X
        for i, M in enumerate(mats):
            h = M @ h
            if i < len(mats) - 1:
                h = torch.tanh(h)
        return h

    target = forward(Ws, X)
    # output: each matrix fitted on the dense model's inputs
    dense_in, out_mats, h = [], [], X
    for i, W in enumerate(Ws):
        B, A = decompose(W, cov(h), "output").factors(r)
        out_mats.append(B @ A)
        h = W @ h
        h = torch.tanh(h) if i < 2 else h
    # sieve: each matrix fitted on the pruned model's inputs, against the dense outputs
    sieve_mats, h_dense, h_pruned = [], X, X
    for i, W in enumerate(Ws):
        B, A = decompose_sieve(W, cov(h_pruned), h_dense @ h_pruned.T / N).factors(r)
        M = B @ A
        sieve_mats.append(M)
        h_dense, h_pruned = W @ h_dense, M @ h_pruned
        if i < 2:
            h_dense, h_pruned = torch.tanh(h_dense), torch.tanh(h_pruned)
    err_out = float(((forward(out_mats, X) - target) ** 2).sum() / (target**2).sum())
    err_sieve = float(((forward(sieve_mats, X) - target) ** 2).sum() / (target**2).sum())
    assert err_sieve < err_out, (err_sieve, err_out)


def test_rank_rounding_and_break_even():
    assert breakeven_rank(1536, 576) == pytest.approx(1536 * 576 / 2112)
    assert round_rank(3) == 8 and round_rank(13) == 16 and round_rank(100) == 96
    assert rank_for_keep(1536, 576, 1.0) is None
    assert rank_for_keep(1536, 576, 0.99) == 416             # below break-even 418.9: saves a little
    assert rank_for_keep(32, 32, 0.9) is None                # 14.4 rounds to 16 = break-even: no saving
    r = rank_for_keep(1536, 576, 0.5)
    assert r % 8 == 0 and abs(keep_of_rank(1536, 576, r) - 0.5) < 0.02
    assert rank_for_keep(32, 32, 0.5) == 8                   # break-even 16 → 8
    with pytest.raises(ValueError):
        rank_for_keep(8, 8, 0.0)


def test_decompose_rejects_bad_shapes_and_methods():
    with pytest.raises(ValueError, match="C must be"):
        decompose(torch.randn(4, 3), torch.eye(4), "output")
    with pytest.raises(ValueError, match="unknown method"):
        decompose(torch.randn(4, 3), torch.eye(3), "magic")
    with pytest.raises(ValueError, match="rank 9 outside"):
        decompose(torch.randn(4, 3), None, "svd").factors(9)
