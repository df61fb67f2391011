"""The GPU path: skipped cleanly where CUDA is absent."""
import pytest
import torch

import tjac

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@cuda
def test_cuda_operator_matches_cpu_and_is_deterministic():
    r = tjac.Recipe.paper(width=8, epochs=2, n_train=256)
    cpu = tjac.TrainingJacobian(r)
    gpu = tjac.TrainingJacobian(r.replace(device="cuda"), cpu.theta0.cuda())
    assert not torch.backends.cuda.matmul.allow_tf32
    V = torch.randn(cpu.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = cpu.matmat(V), gpu.matmat(V.cuda()).cpu()
    assert float((a - b).abs().max() / a.abs().max()) < 1e-11
    a, b = cpu.rmatmat(V), gpu.rmatmat(V.cuda()).cpu()
    assert float((a - b).abs().max() / a.abs().max()) < 1e-11
    assert gpu.check().deterministic


@cuda
def test_cuda_solver_matches_cpu():
    r = tjac.Recipe.paper(width=8, epochs=2, n_train=256)
    s_cpu = tjac.svd(tjac.TrainingJacobian(r), 6, which="top", method="lanczos", tol=1e-10).S
    s_gpu = tjac.svd(tjac.TrainingJacobian(r.replace(device="cuda")), 6, which="top",
                     method="lanczos", tol=1e-10).S.cpu()
    torch.testing.assert_close(s_gpu, s_cpu, rtol=1e-9, atol=0)


def test_cuda_request_without_cuda_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        tjac.Problem(tjac.Recipe.paper(width=4, epochs=1, device="cuda"))


@cuda
@pytest.mark.parametrize("backend", ["fused", "compiled"])
def test_cuda_backends_match_cpu_eager(backend):
    r = tjac.Recipe.paper(width=8, epochs=2, n_train=256)
    cpu = tjac.TrainingJacobian(r, backend="eager")
    gpu = tjac.TrainingJacobian(r.replace(device="cuda"), cpu.theta0.cuda(), backend=backend)
    V = torch.randn(cpu.shape[0], 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for a, b in ((cpu.matmat(V), gpu.matmat(V.cuda()).cpu()),
                 (cpu.rmatmat(V), gpu.rmatmat(V.cuda()).cpu())):
        assert float((a - b).abs().max() / a.abs().max()) < 1e-11
    assert torch.equal(gpu.matmat(V.cuda()), gpu.matmat(V.cuda()))  # bitwise repeatable
