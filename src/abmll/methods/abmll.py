"""ABMLL: meta-learn the global prior θ over LoRA weights; adapt to a task by amortised inference; predict
with the posterior predictive (METHOD.md section 3).

Outer loss over a meta-batch of T tasks (eq. 8):

    L(θ) = (1/T) Σ_i [ NLL(Q_i; W0 + ΔW(φ_iᴷ, ε)) + β · KL(q_{φ_iᴷ} ‖ p_θ) ] − γ · log p(θ)

Posterior predictive (eq. 9):  p(y | x) = (1/S) Σ_s p(y | x, W0 + ΔW_s),  ΔW_s ~ q_φᴷ.

The meta-step, the inner loop, test-time adaptation and the predictive are the template's
(:class:`abmll.methods.template.MetaLearner`) on Bayesian adapter layers; ABMLL adds the KL term of each task
(:meth:`ABMLL.outer_regularizer`) and the hyperprior on θ (:meth:`ABMLL.regularize`).
"""

from __future__ import annotations

from abmll.inner import Factors
from abmll.methods.template import MetaLearner
from abmll.objectives import LayerwiseGrad, log_hyperprior, outer_kl_backward


class ABMLL(MetaLearner):
    """Amortized Bayesian Meta-Learning for LoRA."""

    name = "abmll"
    bayesian = True

    @property
    def beta(self) -> float:
        return self.config.objective.beta

    @property
    def gamma(self) -> float:
        """γ of the hyperprior (eq. 8)."""
        return self.config.objective.hyperprior_weight

    def outer_regularizer(self, phi_k: Factors, phi: Factors, weight: float) -> float:
        """β · KL(q_φᴷ ‖ p_θ) into θ.grad by the gradient of ``inner.order`` (``objectives.outer_kl_backward``):
        first order takes the direct partials at φᴷ (the empirical-Bayes gradient)."""
        if self.beta <= 0:
            return 0.0
        order = self.order
        at = phi_k if order == "first_order" else phi
        return outer_kl_backward(at, self.theta, self.layers, self.beta * weight, order)

    def regularize(self) -> float:
        """−γ · log p(θ) (eq. 6), differentiated one layer at a time."""
        if self.gamma <= 0:
            return 0.0
        grad = LayerwiseGrad(list(self.theta.values()), -self.gamma)
        value = float(log_hyperprior(self.theta, self.layers, self.config.objective, grad))
        grad.backward()
        return value
