"""The meta-learning template: every method that meta-learns LoRA factors θ (ABMLL and its LoRA baselines).

:meth:`MetaLearner.meta_step` owns what every such method does once per meta-step, in one place:

1. split the meta-batch's T tasks over the ranks (each rank takes every world-size-th task);
2. for each task, ask the method for its contribution to θ's gradient (:meth:`MetaLearner.task_gradient`, the
   one hook a method must provide), computed alone from zero and added to a float64 sum;
3. sum that gradient and the tasks' statistics across ranks (all-reduce);
4. add the regulariser of θ itself (:meth:`MetaLearner.regularize`, e.g. ABMLL's hyperprior);
5. the NaN/Inf guard, gradient clipping (``meta.max_grad_norm``, where :attr:`MetaLearner.clips`), one
   optimiser step (:meth:`MetaLearner.make_optimizer`);
6. the step's :class:`~abmll.methods.base.StepLog`.

Every weight sample comes from a seed derived from (seed, stream, step, task, …), and each task's gradient is
added to the sum in float64, so θ does not depend on the number of ranks (up to the rounding of a float64 sum
to float32).

The default :meth:`~MetaLearner.task_gradient` is the task-structured loop of ABMLL and MAML (eqs. 7–8): K
inner steps from θ on the support set, then the query loss at φᴷ, its gradient sent to θ to first order
(straight through) or second order (through the inner steps). Test time is K_test inner steps from θ and the
(posterior) predictive. The adapter layers are Bayesian or deterministic (:attr:`Method.bayesian`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from abmll.bayes.inject import bayes_layers, posterior, prior, weight_sample
from abmll.bayes.layer import FACTORS, MEAN_FACTORS, SIGMA_FACTORS
from abmll.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from abmll.config import ABMLLConfig
from abmll.distributed import all_reduce_sum, broadcast_from_main, is_sharded, max_over_processes, world
from abmll.errors import CheckpointError, ConfigError
from abmll.inner import Factors, adapt, chunks, derive_seed, straight_through, unordered
from abmll.methods.base import LogFn, MetaBatches, Method, StepLog
from abmll.models import eval_mode
from abmll.objectives import kl_divergence
from abmll.tasks.data import Example

#: Tags that keep the seed streams of the different uses of ε apart.
INNER, OUTER, ADAPT, PREDICT = 1, 2, 3, 4


@dataclass
class TaskStats:
    """One task's contribution to a meta-step's log (each a mean over the task's examples and samples)."""

    nll: float  # the outer loss
    kl: float = 0.0
    support_first: float | None = None  # the support loss before the first inner step
    support_last: float | None = None  # … and after the last


class MetaLearner(Method):
    """A method that meta-learns the LoRA factors θ with the shared meta-step."""

    #: False for a method whose update is not a gradient to clip (Reptile's ε-step): ``meta.max_grad_norm``
    #: does not apply to it.
    clips = True

    def __init__(self, model: nn.Module, scorer, config: ABMLLConfig) -> None:
        super().__init__(model, scorer, config)
        self.layers = bayes_layers(model)
        for layer in self.layers.values():
            layer.merge = config.compute.merge_without_grad
        self.theta = prior(model, FACTORS if self.bayesian else MEAN_FACTORS)
        self.optimizer, self._optimizer_order = self.make_optimizer()

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, list[str]]:
        """AdamW on θ (``meta.outer_lr``; the σ factors at ``meta.sigma_lr``, METHOD.md §3), and the names of
        θ's factors in the optimiser's order."""
        meta = self.config.meta
        sigma = [k for k in self.theta if k.rpartition(".")[2] in SIGMA_FACTORS]
        mean = [k for k in self.theta if k not in sigma]
        groups = [{"params": [self.theta[k] for k in mean]}]
        if sigma:
            groups.append({"params": [self.theta[k] for k in sigma], "lr": meta.sigma_lr or meta.outer_lr})
        return torch.optim.AdamW(groups, lr=meta.outer_lr, weight_decay=meta.weight_decay), mean + sigma

    # --- weight samples and the objective's weights ---------------------------------------------------
    def seeds(self, *coords: int, count: int) -> list[int | None]:
        """The weight-sample seeds at ``coords`` (``count`` of them); ``[None]`` (the mean ΔW) for a
        deterministic method."""
        if not self.bayesian:
            return [None]
        return [derive_seed(self.config.seed, *coords, s) for s in range(count)]

    @property
    def beta(self) -> float:
        """β of the KL term (eqs. 7–8): 0 but for a Bayesian method."""
        return 0.0

    @property
    def order(self) -> str:
        """How the outer gradient reaches θ (``inner.order``)."""
        return self.config.inner.order

    # --- the inner loop -------------------------------------------------------------------------------
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
            self.grouped(support),
            self.scorer,
            steps=steps,
            lr=inner.inner_lr if lr is None else lr,
            sigma_lr=inner.sigma_lr if self.bayesian else None,  # a deterministic LoRA has no σ
            beta=self.beta,
            seeds=seeds,
            micro_batch_size=self.config.meta.micro_batch_size,
            create_graph=create_graph,
            losses=losses,
            # Under FSDP every forward pass is collective: a retry on one rank alone would hang the others.
            backtrack=None if is_sharded(self.model) else inner.backtrack,
        )

    # --- a task's contribution (the hook) ------------------------------------------------------------
    def task_gradient(self, episode, step: int, task_index: int, weight: float) -> TaskStats:
        """Add ``weight`` × the gradient of one task's outer loss to θ.grad (eq. 8, one term of the sum).

        The task-structured loop: φᴷ by K inner steps on the support set, the query NLL at φᴷ averaged over
        weight samples, its gradient sent to θ straight through (first order) or through the inner steps
        (``second_order``), then :meth:`outer_regularizer`."""
        if self.order == "second_order":
            with sdpa_kernel(SDPBackend.MATH):  # SDPA's fused kernels have no double backward
                return self._task_gradient(episode, step, task_index, weight, second=True)
        return self._task_gradient(episode, step, task_index, weight, second=False)

    def _task_gradient(self, episode, step: int, task_index: int, weight: float, second: bool) -> TaskStats:
        samples = self.config.inner.inner_samples
        support_losses: list[float] = []
        phi_k = self.inner_loop(
            episode.support,
            lambda k: self.seeds(INNER, step, task_index, k, count=samples),
            self.config.inner.inner_steps,
            create_graph=second,
            losses=support_losses,
        )
        phi = phi_k if second else straight_through(phi_k, self.theta)
        outer = list(episode.query)
        if self.config.meta.outer_data == "support+query":
            outer = list(episode.support) + outer
        outer = self.grouped(outer)
        seeds = self.seeds(OUTER, step, task_index, count=samples)
        nll = 0.0
        with posterior(self.model, phi):
            for seed in seeds:
                with weight_sample(self.model, seed):
                    for chunk in chunks(outer, self.config.meta.micro_batch_size):
                        loss = self.scorer.nll(self.model, chunk) * (len(chunk) / (len(outer) * len(seeds)))
                        (loss * weight).backward(retain_graph=second)
                        nll += float(loss.detach())
        return TaskStats(
            nll=nll,
            kl=self.outer_regularizer(phi_k, phi, weight),
            support_first=support_losses[0] if support_losses else None,
            support_last=support_losses[-1] if support_losses else None,
        )

    def outer_regularizer(self, phi_k: Factors, phi: Factors, weight: float) -> float:
        """Backpropagate ``weight`` × a task's regulariser at its posterior into θ.grad (ABMLL: β · KL); returns
        its unweighted value. ``phi_k``: φᴷ as the inner loop left it; ``phi``: φᴷ as the outer loss saw it."""
        return 0.0

    def task_weight(self, episodes: Sequence, index: int) -> float:
        """The weight of task ``index`` in the meta-batch's loss: 1/T."""
        return 1.0 / len(episodes)

    def regularize(self) -> float:
        """Add the gradient of θ's own regulariser to θ.grad (ABMLL: −γ · log p(θ)); returns log p(θ)."""
        return 0.0

    # --- the meta-step -------------------------------------------------------------------------------
    def zero_gradients(self) -> None:
        for p in self.theta.values():
            p.grad = torch.zeros_like(p)

    def apply_gradients(self, loss: float = 0.0) -> float:
        """Clip θ's gradient (where :attr:`clips`), take one optimiser step, advance the step counter; returns the
        gradient norm. A non-finite ``loss`` or gradient stops training or skips the step
        (:meth:`Method.finite_or_skip`)."""
        params = list(self.theta.values())
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not self.finite_or_skip(loss, float(grad_norm)):
            self.zero_gradients()
            self.step += 1
            return float(grad_norm)
        if self.clips and self.config.meta.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.meta.max_grad_norm, grad_norm)
        self.optimizer.step()
        self.step += 1
        return float(grad_norm)

    def meta_step(self, episodes: Sequence) -> StepLog:
        """One optimiser step on θ over a meta-batch (eq. 8); the steps of the module docstring."""
        rank, world_size = world()
        if world_size > 1 and is_sharded(self.model):
            self._check_equal_work(episodes, rank, world_size)
        params = list(self.theta.values())
        device = params[0].device
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        # Σ w·nll, Σ w·kl, Σ w over this rank's tasks (w: the task's weight); Σ w·support_first, Σ w·support_last,
        # Σ w over those tasks that report support losses (an inner loop ran)
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        for i in range(rank, len(episodes), world_size):
            for p in params:
                p.grad = None
            weight = self.task_weight(episodes, i)
            stats = self.task_gradient(episodes[i], self.step, i, weight)
            for acc, p in zip(total, params, strict=True):
                if p.grad is not None:
                    acc.add_(p.grad)
            support = (stats.support_first, stats.support_last, 1.0) if stats.support_first is not None else (0, 0, 0)
            values = [stats.nll, stats.kl, 1.0, *support]
            sums += weight * torch.tensor(values, dtype=torch.float64, device=device)
        all_reduce_sum([*total, sums])
        for acc, p in zip(total, params, strict=True):
            p.grad = acc.to(p.dtype)
        del total
        log_prior = self.regularize()
        n, n_inner = float(sums[2]), float(sums[5])
        nll, kl = float(sums[0]) / n, float(sums[1]) / n
        grad_norm = self.apply_gradients(loss=nll + kl + log_prior)
        first, last = (float(sums[3]) / n_inner, float(sums[4]) / n_inner) if n_inner > 0 else (None, None)
        return StepLog(
            step=self.step,
            outer_nll=nll,
            kl=kl,
            beta_kl_over_nll=(self.beta * kl / nll) if nll > 0 else float("nan"),
            support_nll_first=first,
            support_nll_last=last,
            log_hyperprior=log_prior,
            grad_norm=grad_norm,
            world_size=world_size,
            skipped_steps=self.skipped_steps,
        )

    def forward_passes(self, episode) -> int:
        """Forward passes (each with its backward) that one task of a meta-step runs."""
        meta, samples = self.config.meta, self.config.inner.inner_samples if self.bayesian else 1
        outer = len(episode.query) + (len(episode.support) if meta.outer_data == "support+query" else 0)
        inner = self.config.inner.inner_steps * len(chunks(episode.support, meta.micro_batch_size))
        return samples * (inner + len(chunks(range(outer), meta.micro_batch_size)))

    def _check_equal_work(self, episodes: Sequence, rank: int, world_size: int) -> None:
        """Under FSDP every rank must run the same number of forward and backward passes (each one gathers
        the sharded weights from all ranks); raise a clear error where they would differ and the run hang."""
        mine = sum(self.forward_passes(episodes[i]) for i in range(rank, len(episodes), world_size))
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

    # --- test time -------------------------------------------------------------------------------------
    def adapt(self, support: Sequence[Example], seed: int) -> Factors:
        """φᴷ after K_test inner steps from θ on the support set, at the test-time α (``inner.test_inner_lr``)."""
        inner = self.config.inner
        phi = self.inner_loop(
            support,
            lambda k: self.seeds(ADAPT, seed, k, count=inner.inner_samples),
            inner.test_inner_steps,
            lr=inner.inner_lr if inner.test_inner_lr is None else inner.test_inner_lr,
        )
        return {k: v.detach() for k, v in phi.items()}

    @torch.no_grad()
    def predict(self, adapted: Factors | None, query: Sequence[Example], seed: int) -> torch.Tensor:
        """The posterior predictive (eq. 9): probabilities averaged over S weight samples, or the mean ΔW (a
        deterministic method, or ``predict.mode = mean``)."""
        mode = self.config.predict.mode if self.bayesian else "mean"
        seeds = [None] if mode == "mean" else self.seeds(PREDICT, seed, count=self.config.predict.samples)
        order = self.batch_order(query)
        parts = chunks([query[i] for i in order], self.config.meta.micro_batch_size)
        probs = [0.0] * len(parts)
        with posterior(self.model, adapted):
            for s in seeds:  # one weight sample at a time: a prompt prefix shared by the query set is encoded once
                with weight_sample(self.model, s), self.scorer.reuse_prefix():
                    for i, chunk in enumerate(parts):
                        probs[i] = probs[i] + torch.softmax(self.scorer(self.model, chunk), dim=-1)
        return unordered(torch.cat([p / len(seeds) for p in probs]), order).cpu()

    @torch.no_grad()
    def posterior_kl(self, adapted: Any) -> float | None:
        """KL(q_φᴷ ‖ p_θ) of a task posterior (eq. 5), for a Bayesian method."""
        phi = getattr(adapted, "phi", adapted)  # abmll-icl keeps φ with its demonstrations
        if not self.bayesian or not isinstance(phi, dict):
            return None
        return float(kl_divergence(phi, {k: v.detach() for k, v in self.theta.items()}, self.layers))

    # --- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.theta.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy θ from ``state``; factors this method does not hold (σ of a Bayesian checkpoint loaded into a
        deterministic LoRA) are ignored."""
        missing = [k for k in self.theta if k not in state]
        if missing:
            raise CheckpointError(
                f"method '{self.name}' needs factor '{missing[0]}', which the weights do not have "
                f"({len(missing)} missing; a deterministic LoRA's weights hold no σ factors)"
            )
        with torch.no_grad():
            for k, v in self.theta.items():
                v.copy_(state[k])

    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, values = optimizer_to_tensors(self.optimizer, self._optimizer_order)
        return tensors, {"step": self.step, "optimizer": values}

    def load_trainer_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.step = int(values["step"])
        optimizer_from_tensors(self.optimizer, self._optimizer_order, tensors, values["optimizer"])
