"""ABMLL: meta-learn the global prior θ over LoRA weights; adapt to a task by amortised inference; predict
with the posterior predictive (METHOD.md section 3).

Outer loss over a meta-batch of T tasks (eq. 8):

    L(θ) = (1/T) Σ_i [ NLL(Q_i; W0 + ΔW(φ_iᴷ, ε)) + β · KL(q_{φ_iᴷ} ‖ p_θ) ] − γ · log p(θ)

Posterior predictive (eq. 9):  p(y | x) = (1/S) Σ_s p(y | x, W0 + ΔW_s),  ΔW_s ~ q_φᴷ.

Across ranks (``torch.distributed`` initialised, e.g. by Accelerate or torchrun; see
:mod:`abmll.distributed`) each rank takes every world-size-th task of the meta-batch and θ's gradients are
summed with an all-reduce. Every weight sample comes from a seed derived from (seed, step, task index, …),
and each task's gradient is added to the sum in float64, so that θ does not depend on the number of ranks
(up to the rounding of a float64 sum to float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from abmll.bayes.inject import bayes_layers, posterior, prior, weight_sample
from abmll.bayes.layer import SIGMA_FACTORS
from abmll.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from abmll.config import ABMLLConfig
from abmll.distributed import all_reduce_sum, broadcast_from_main, is_sharded, max_over_processes, world
from abmll.errors import ConfigError
from abmll.inner import Factors, adapt, chunks, derive_seed, straight_through
from abmll.methods.base import LogFn, MetaBatches, Method
from abmll.models import eval_mode
from abmll.objectives import LayerwiseGrad, log_hyperprior, outer_kl_backward
from abmll.tasks.data import Example

# Tags that keep the seed streams of different uses of ε apart.
_INNER, _OUTER, _ADAPT, _PREDICT = 1, 2, 3, 4


#: (rank, world size); kept under this name for the baselines that import it.
_world = world


class ABMLL(Method):
    """Amortized Bayesian Meta-Learning for LoRA."""

    name = "abmll"
    #: False for the deterministic variants (structured LoRA): ΔW = μ, no KL, no hyperprior.
    stochastic = True

    def __init__(self, model: nn.Module, scorer, config: ABMLLConfig) -> None:
        super().__init__(model, scorer, config)
        self.layers = bayes_layers(model)
        self.theta = prior(model)
        meta = config.meta
        # Two groups: the mean factors at meta.outer_lr, the σ factors at meta.sigma_lr (METHOD.md §3).
        sigma = [k for k in self.theta if k.rpartition(".")[2] in SIGMA_FACTORS]
        mean = [k for k in self.theta if k not in sigma]
        self._optimizer_order = mean + sigma
        groups = [{"params": [self.theta[k] for k in mean]}]
        groups.append({"params": [self.theta[k] for k in sigma], "lr": meta.sigma_lr or meta.outer_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=meta.outer_lr, weight_decay=meta.weight_decay)

    # --- weights samples ---------------------------------------------------------------------------
    def _seeds(self, *coords: int, count: int) -> list[int | None]:
        if not self.stochastic:
            return [None]
        return [derive_seed(self.config.seed, *coords, s) for s in range(count)]

    @property
    def beta(self) -> float:
        return self.config.objective.beta if self.stochastic else 0.0

    @property
    def gamma(self) -> float:
        return self.config.objective.hyperprior_weight if self.stochastic else 0.0

    # --- meta-training -----------------------------------------------------------------------------
    def inner_loop(
        self,
        support: Sequence[Example],
        seeds: Callable[[int], Sequence[int | None]],
        steps: int,
        create_graph: bool = False,
        losses: list[float] | None = None,
        lr: float | None = None,
    ) -> Factors:
        """φᴷ: ``steps`` inner steps from θ on ``support`` (eq. 7), α = ``lr`` (default ``inner.inner_lr``)."""
        inner = self.config.inner
        return adapt(
            self.model,
            self.theta,
            support,
            self.scorer,
            steps=steps,
            lr=inner.inner_lr if lr is None else lr,
            sigma_lr=inner.sigma_lr if self.stochastic else None,  # a deterministic LoRA never uses σ
            beta=self.beta,
            seeds=seeds,
            micro_batch_size=self.config.meta.micro_batch_size,
            create_graph=create_graph,
            losses=losses,
        )

    def task_outer_backward(self, episode, step: int, task_index: int, weight: float) -> dict[str, float]:
        """Backpropagate ``weight`` × one task's outer loss into θ.grad (eq. 8, one term of the sum)."""
        if self.config.inner.order == "second_order":
            with sdpa_kernel(SDPBackend.MATH):  # SDPA's fused kernels have no double backward
                return self._task_outer_backward(episode, step, task_index, weight, second=True)
        return self._task_outer_backward(episode, step, task_index, weight, second=False)

    def _task_outer_backward(self, episode, step: int, task_index: int, weight: float, second: bool) -> dict:
        samples = self.config.inner.inner_samples
        support_losses: list[float] = []
        phi = self.inner_loop(
            episode.support,
            lambda k: self._seeds(_INNER, step, task_index, k, count=samples),
            self.config.inner.inner_steps,
            create_graph=second,
            losses=support_losses,
        )
        phi_k = phi
        if not second:
            phi = straight_through(phi, self.theta)
        outer = list(episode.query)
        if self.config.meta.outer_data == "support+query":
            outer = list(episode.support) + outer
        seeds = self._seeds(_OUTER, step, task_index, count=samples)
        nll_value = 0.0
        with posterior(self.model, phi):
            for seed in seeds:
                with weight_sample(self.model, seed):
                    for chunk in chunks(outer, self.config.meta.micro_batch_size):
                        loss = self.scorer.nll(self.model, chunk) * (len(chunk) / (len(outer) * len(seeds)))
                        (loss * weight).backward(retain_graph=second)
                        nll_value += float(loss.detach())
        kl_value = 0.0
        if self.beta > 0:
            order = self.config.inner.order
            kl_value = outer_kl_backward(
                phi_k if order == "first_order" else phi, self.theta, self.layers, self.beta * weight, order
            )
        return {
            "nll": nll_value,
            "kl": kl_value,
            "support_first": support_losses[0] if support_losses else float("nan"),
            "support_last": support_losses[-1] if support_losses else float("nan"),
        }

    def zero_gradients(self) -> None:
        for p in self.theta.values():
            p.grad = torch.zeros_like(p)

    def apply_gradients(self, loss: float = 0.0) -> float:
        """Clip θ's gradient, take one optimiser step, advance the step counter; returns the gradient norm.
        A non-finite ``loss`` or gradient stops training or skips the step (:meth:`Method.finite_or_skip`)."""
        params = list(self.theta.values())
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not self.finite_or_skip(loss, float(grad_norm)):
            self.zero_gradients()
            self.step += 1
            return float(grad_norm)
        if self.config.meta.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.meta.max_grad_norm, grad_norm)
        self.optimizer.step()
        self.step += 1
        return float(grad_norm)

    def meta_step(self, episodes: Sequence) -> dict[str, float]:
        """One optimiser step on θ over a meta-batch (eq. 8).

        Each task's gradient is computed alone (from zero) and added to a float64 sum, which is then summed
        across ranks: the order in which tasks are grouped on ranks changes nothing but float64 rounding."""
        rank, world_size = world()
        if world_size > 1 and is_sharded(self.model):
            self._check_equal_work(episodes, rank, world_size)
        params = list(self.theta.values())
        device = params[0].device
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        T = len(episodes)
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # nll, kl, support_first, support_last, tasks
        for i in range(rank, T, world_size):
            for p in params:
                p.grad = None
            stats = self.task_outer_backward(episodes[i], self.step, i, 1.0 / T)
            for acc, p in zip(total, params, strict=True):
                if p.grad is not None:
                    acc.add_(p.grad)
            sums += torch.tensor(
                [stats["nll"], stats["kl"], stats["support_first"], stats["support_last"], 1.0],
                dtype=torch.float64,
                device=device,
            )
        all_reduce_sum([*total, sums])
        for acc, p in zip(total, params, strict=True):
            p.grad = acc.to(p.dtype)
        del total
        log_prior = 0.0
        if self.gamma > 0:  # −γ · log p(θ), differentiated one layer at a time
            lp_grad = LayerwiseGrad(params, -self.gamma)
            log_prior = float(log_hyperprior(self.theta, self.layers, self.config.objective, lp_grad))
            lp_grad.backward()
        grad_norm = self.apply_gradients(loss=float(sums[0] + sums[1]) + log_prior)
        n = float(sums[4])
        nll, kl = float(sums[0]) / n, float(sums[1]) / n
        return {
            "step": self.step,
            "outer_nll": nll,
            "kl": kl,
            "beta_kl_over_nll": (self.beta * kl / nll) if nll > 0 else float("nan"),
            "support_nll_first": float(sums[2]) / n,
            "support_nll_last": float(sums[3]) / n,
            "log_hyperprior": log_prior,
            "grad_norm": grad_norm,
            "world_size": world_size,
        }

    def _forward_passes(self, episode) -> int:
        """Forward passes (each with its backward) that one task of a meta-step runs."""
        meta, samples = self.config.meta, self.config.inner.inner_samples if self.stochastic else 1
        outer = len(episode.query) + (len(episode.support) if meta.outer_data == "support+query" else 0)
        inner = self.config.inner.inner_steps * len(chunks(episode.support, meta.micro_batch_size))
        return samples * (inner + len(chunks(range(outer), meta.micro_batch_size)))

    def _check_equal_work(self, episodes: Sequence, rank: int, world_size: int) -> None:
        """Under FSDP every rank must run the same number of forward and backward passes (each one gathers
        the sharded weights from all ranks); raise a clear error where they would differ and the run hang."""
        mine = sum(self._forward_passes(episodes[i]) for i in range(rank, len(episodes), world_size))
        most, fewest = max_over_processes(mine), -max_over_processes(-mine)
        if most != fewest:
            raise ConfigError(
                f"meta-step {self.step + 1}: with the base model sharded (FSDP) every rank must run the same "
                f"number of forward passes, but they run between {fewest} and {most}; make meta.meta_batch_size "
                f"({len(episodes)}) a multiple of the number of processes ({world_size}) and give every task at "
                f"least meta.support_size + meta.query_size examples"
            )

    def meta_train(
        self,
        batches: MetaBatches,
        steps: int | None = None,
        log: LogFn | None = None,
        should_stop: Callable[[int], bool] | None = None,
    ) -> None:
        total = self.config.meta.meta_steps if steps is None else steps
        eval_mode(self.model)  # no dropout: the randomness is the weight samples'
        broadcast_from_main(self.theta.values())  # every rank starts from rank 0's θ
        while self.step < total:
            record = self.meta_step(batches.meta_batch(self.step))
            if log is not None:
                log(record)
            if should_stop is not None and should_stop(self.step):
                break

    # --- test time ---------------------------------------------------------------------------------
    def adapt(self, support: Sequence[Example], seed: int) -> Factors:
        """φᴷ after K_test inner steps from θ on the support set, at the test-time α (``inner.test_inner_lr``)."""
        inner = self.config.inner
        phi = self.inner_loop(
            support,
            lambda k: self._seeds(_ADAPT, seed, k, count=inner.inner_samples),
            inner.test_inner_steps,
            lr=inner.inner_lr if inner.test_inner_lr is None else inner.test_inner_lr,
        )
        return {k: v.detach() for k, v in phi.items()}

    @torch.no_grad()
    def predict(self, adapted: Factors | None, query: Sequence[Example], seed: int) -> torch.Tensor:
        """The posterior predictive (eq. 9): probabilities averaged over S samples, or the mean ΔW."""
        mode = self.config.predict.mode if self.stochastic else "mean"
        seeds = [None] if mode == "mean" else self._seeds(_PREDICT, seed, count=self.config.predict.samples)
        parts = chunks(list(query), self.config.meta.micro_batch_size)
        probs = [0.0] * len(parts)
        with posterior(self.model, adapted):
            for s in seeds:  # one weight sample at a time: a prompt prefix shared by the query set is encoded once
                with weight_sample(self.model, s), self.scorer.reuse_prefix():
                    for i, chunk in enumerate(parts):
                        probs[i] = probs[i] + torch.softmax(self.scorer(self.model, chunk), dim=-1)
        return torch.cat([p / len(seeds) for p in probs]).cpu()

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.theta.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.theta.items():
                v.copy_(state[k])

    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, values = optimizer_to_tensors(self.optimizer, self._optimizer_order)
        return tensors, {"step": self.step, "optimizer": values}

    def load_trainer_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.step = int(values["step"])
        optimizer_from_tensors(self.optimizer, self._optimizer_order, tensors, values["optimizer"])
