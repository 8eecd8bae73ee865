"""What the implicit GNNs share: the convergence error, conjugate gradient, and the hook
that turns a fixed point into a differentiable output by implicit differentiation."""

from __future__ import annotations

from typing import Callable

import torch


class ConvergenceError(RuntimeError):
    """An iterative solver stopped before reaching its tolerance; ``residual`` says how far it was."""

    def __init__(self, what: str, residual: float, tol: float, iterations: int):
        super().__init__(f"{what} did not converge: residual {residual:.3g} > tol {tol:.3g} after {iterations} "
                         "iterations")
        self.residual, self.tol, self.iterations = residual, tol, iterations


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tol: float = 1e-10,
                       max_iter: int = 500) -> torch.Tensor:
    """Solve A x = b for a symmetric positive definite A given as ``matvec``; relative tolerance on |r|."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = torch.sum(r * r)
    target = tol * tol * max(float(rs), 1e-300)
    for iteration in range(max_iter):
        if float(rs) <= target:
            return x
        ap = matvec(p)
        alpha = rs / torch.sum(p * ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.sum(r * r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    if float(rs) <= target:
        return x
    raise ConvergenceError("conjugate gradient (implicit backward)", float(rs.sqrt()), tol, max_iter)


def attach_energy_gradient(h_star: torch.Tensor, energy_gradient: Callable[..., torch.Tensor],
                           step: float) -> torch.Tensor:
    """H* as a differentiable function of the energy's parameters θ.

    The value is exactly ``h_star``. Backward: with g = ∂L/∂H*, solve (∇²_HH E) u = g by
    conjugate gradient on Hessian-vector products (SPD by the β term), then
    dL/dθ = −u · ∇²_Hθ E — by back-propagating u/step through the step −step·∇_H E(H*).
    """
    h0 = h_star.detach().requires_grad_(True)
    with torch.enable_grad():
        grad = energy_gradient(h0, create_graph=True)
    out = h_star.detach() - step * (grad - grad.detach())  # value h_star, gradient through ∇E's graph

    def implicit_backward(g: torch.Tensor) -> torch.Tensor:
        def hessian_vector(v):
            return torch.autograd.grad(grad, h0, v, retain_graph=True)[0]

        return conjugate_gradient(hessian_vector, g) / step

    if out.requires_grad:
        out.register_hook(implicit_backward)
    return out


def attach_fixed_point_gradient(h_star: torch.Tensor, update: Callable[[torch.Tensor], torch.Tensor],
                                tol: float = 1e-10, max_iter: int = 1000) -> torch.Tensor:
    """H* = F(H*) as a differentiable function of F's parameters: u = g + J_Fᵀ u by fixed-point
    iteration (J_F contracts), then back-propagate u through F(H*)."""
    h0 = h_star.detach().requires_grad_(True)
    with torch.enable_grad():
        value = update(h0)
    out = h_star.detach() + (value - value.detach())

    def implicit_backward(g: torch.Tensor) -> torch.Tensor:
        u = g
        for iteration in range(max_iter):
            new = g + torch.autograd.grad(value, h0, u, retain_graph=True)[0]
            change = float((new - u).abs().max())
            u = new
            if change <= tol * max(float(g.abs().max()), 1e-300):
                return u
        raise ConvergenceError("fixed-point iteration (implicit backward)", change, tol, max_iter)

    if out.requires_grad:
        out.register_hook(implicit_backward)
    return out
