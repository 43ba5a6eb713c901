"""The ABMLL engine on a tiny random Llama: parameterisation, objectives, inner loop, meta-gradients,
memory, a real learning signal, and save/load."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BAD, GOOD, adapted_tiny, family_task, make_config

from abmll.bayes import (
    adapters_disabled,
    bayes_layers,
    clone_factors,
    inject,
    posterior,
    prior,
    weight_sample,
)
from abmll.checkpoint import load_prior_into, save_checkpoint
from abmll.config import ABMLLConfig, preset
from abmll.errors import CheckpointError, ConfigError, ModelError
from abmll.inner import adapt
from abmll.methods import ABMLL
from abmll.methods.template import OUTER
from abmll.objectives import gaussian_kl, kl_divergence, log_hyperprior
from abmll.tasks.data import Episode, MetaBatchSampler
from abmll.tiny import tiny_llama


def _perturb(theta: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> None:
    """Move θ away from its initialisation so that μθ ≠ 0 and σθ varies per entry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theta.values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _ids(tokenizer, text: str) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([tokenizer(text)["input_ids"]])}


# --- parameterisation --------------------------------------------------------------------------------
@pytest.mark.parametrize("transform", ["abs", "softplus", "exp"])
def test_initial_sigma_equals_sigma_init_and_kl_is_zero(transform):
    config = make_config(**{"lora.sigma_transform": transform, "lora.sigma_init": 2e-3})
    model, _ = adapted_tiny(config)
    layers, theta = bayes_layers(model), prior(model)
    for layer in layers.values():
        sigma = layer.sigma(layer.prior_factors())
        torch.testing.assert_close(sigma, torch.full_like(sigma, 2e-3), rtol=1e-5, atol=0)
        assert torch.count_nonzero(layer.mean(layer.prior_factors())) == 0
    phi = clone_factors(theta)
    assert kl_divergence(phi, theta, layers).item() == 0.0


@pytest.mark.parametrize("transform", ["abs", "softplus", "exp"])
def test_sigma_max_bounds_every_entry_smoothly(transform):
    """Eq. 2b: σ < σ_max + c however large the pre-activation, equal to eq. 2's σ far below σ_max, and a finite
    gradient everywhere (in log space under exp: no overflow at a pre-activation of 10⁴)."""
    from abmll.bayes.layer import sigma_dense

    offset = ABMLLConfig().override({"lora.sigma_transform": transform}).lora.sigma_offset
    pre = torch.tensor([[-30.0, -5.0, 0.0, 5.0, 50.0, 1e4]], requires_grad=True)
    one = torch.ones(1, 1)
    bounded = sigma_dense(pre, one, torch.tensor(0.0), transform, offset, 1e-8, maximum=1.0)
    free = sigma_dense(pre.detach(), one, torch.tensor(0.0), transform, offset, 1e-8)
    assert torch.isfinite(bounded).all() and (bounded <= 1.0 + 1e-8).all()
    assert (bounded <= free).all() and bounded[0, -1] > 0.99
    small = free < 1e-3
    torch.testing.assert_close(bounded[small], free[small], rtol=2e-3, atol=0)
    bounded.sum().backward()
    assert torch.isfinite(pre.grad).all()


def test_mean_mode_at_initialisation_equals_base_model():
    config = make_config()
    base, tokenizer = tiny_llama(seed=3)
    model, _ = tiny_llama(seed=3)
    inject(model, config.lora)
    batch = _ids(tokenizer, "the cat sat on the table and the dog ran")
    with torch.no_grad():
        expected = base(**batch).logits
        with weight_sample(model, None):
            got = model(**batch).logits
        with adapters_disabled(model):
            off = model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(off, expected, rtol=0, atol=1e-6)


def test_targets_by_regex_and_all_linear():
    config = make_config(**{"lora.targets": r"re:.*layers\.1\.mlp\..*"})
    model, _ = adapted_tiny(config)
    assert sorted(bayes_layers(model)) == [
        f"model.layers.1.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")
    ]
    model, _ = adapted_tiny(make_config(**{"lora.targets": "all-linear"}))
    names = list(bayes_layers(model))
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    with pytest.raises(ModelError, match="no module of the model matches"):
        adapted_tiny(make_config(**{"lora.targets": ["c_attn"]}))


def test_gpt2_conv1d_is_adapted():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32)).eval()
    batch = {"input_ids": torch.arange(10)[None]}
    with torch.no_grad():
        expected = gpt2(**batch).logits
    inject(gpt2, make_config(**{"lora.targets": ["c_attn"]}).lora)
    layer = bayes_layers(gpt2)["transformer.h.0.attn.c_attn"]
    assert (layer.in_features, layer.out_features) == (32, 96)
    _perturb(prior(gpt2), 0)
    with torch.no_grad(), weight_sample(gpt2, 7):
        sampled = gpt2(**batch).logits
    assert not torch.allclose(sampled, expected)
    with torch.no_grad(), adapters_disabled(gpt2):
        torch.testing.assert_close(gpt2(**batch).logits, expected)


# --- objectives --------------------------------------------------------------------------------------
def test_closed_form_kl_matches_torch_distributions():
    config = make_config()
    model, _ = adapted_tiny(config)
    layers, theta = bayes_layers(model), prior(model)
    _perturb(theta, 1)
    phi = clone_factors(theta)
    _perturb(phi, 2, scale=0.02)
    expected = torch.zeros((), dtype=torch.float64)
    by = lambda flat, name: {k.rpartition(".")[2]: v for k, v in flat.items() if k.rpartition(".")[0] == name}  # noqa: E731
    for name, layer in layers.items():
        q, p = by(phi, name), by(theta, name)
        dq = torch.distributions.Normal(layer.mean(q).double(), layer.sigma(q).double())
        dp = torch.distributions.Normal(layer.mean(p).double(), layer.sigma(p).double())
        expected += torch.distributions.kl_divergence(dq, dp).sum()
    got = kl_divergence(phi, theta, layers)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    # and on plain random tensors
    g = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(50, generator=g), torch.randn(50, generator=g)
    sq, sp = torch.rand(50, generator=g) + 0.1, torch.rand(50, generator=g) + 0.1
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp)
    )
    torch.testing.assert_close(gaussian_kl(mq, sq, mp, sp), ref.sum())


def test_hyperprior_matches_gamma_log_prob():
    config = make_config(**{"objective.gamma_a0": 2.0, "objective.gamma_b0": 0.5, "lora.sigma_init": 0.3})
    model, _ = adapted_tiny(config)
    layers, theta = bayes_layers(model), prior(model)
    _perturb(theta, 4, scale=0.01)
    gamma = torch.distributions.Gamma(
        torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    )
    expected = sum(
        gamma.log_prob(layer.sigma(layer.prior_factors()).double().pow(-2)).sum() for layer in layers.values()
    )
    assert log_hyperprior(theta, layers, config.objective).item() == pytest.approx(expected.item(), rel=1e-5)
    # the optional Normal prior on μθ adds Σ log N(μ; 0, s²)
    with_mean = config.override({"objective.mean_prior_std": 0.7})
    normal = torch.distributions.Normal(0.0, 0.7)
    extra = sum(normal.log_prob(layer.mean(layer.prior_factors())).sum() for layer in layers.values())
    got = log_hyperprior(theta, layers, with_mean.objective).item()
    assert got == pytest.approx(expected.item() + extra.item(), rel=1e-5)


def test_presets_carry_the_papers_values():
    v1, v2 = preset("paper-v1"), preset("paper-v2")
    assert (v1.objective.beta, v1.objective.hyperprior_weight) == (5e-10, 1e-6)
    assert (v2.objective.beta, v2.objective.hyperprior_weight) == (1e-7, 1e-7)
    for cfg in (v1, v2):
        assert cfg.lora.sigma_floor == pytest.approx(math.exp(-20)) and cfg.inner.test_inner_steps == 10
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("paper-v9")


@pytest.mark.parametrize(
    "override, field",
    [
        ({"lora.rank": 0}, "lora.rank"),
        ({"lora.sigma_transform": "relu"}, "lora.sigma_transform"),
        ({"lora.sigma_init": 1e-9, "lora.sigma_floor": 1e-6}, "lora.sigma_init"),
        ({"objective.beta": -1.0}, "objective.beta"),
        ({"inner.order": "third"}, "inner.order"),
        ({"meta.outer_data": "all"}, "meta.outer_data"),
        ({"scoring.scorer": "logit"}, "scoring.scorer"),
        ({"inner.nope": 1}, "inner.nope"),
    ],
)
def test_bad_config_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ABMLLConfig().override(override)


# --- sampling ----------------------------------------------------------------------------------------
def test_sampled_delta_w_has_mean_mu_and_variance_sigma_squared():
    config = make_config(**{"lora.sigma_init": 0.05})
    model, _ = adapted_tiny(config)
    _perturb(prior(model), 5)
    layer = bayes_layers(model)["model.layers.0.self_attn.v_proj"]  # 32 × 64 under GQA
    f = {k: v.detach() for k, v in layer.prior_factors().items()}
    mu, sigma = layer.mean(f), layer.sigma(f)
    n = 2000
    samples = torch.stack([layer.sample_delta(f, seed) for seed in range(n)])
    z_mean = (samples.mean(0) - mu) / (sigma / math.sqrt(n))
    # the sample variance of n normals has relative sd sqrt(2 / (n - 1))
    z_var = (samples.var(0) / sigma.square() - 1) / math.sqrt(2 / (n - 1))
    # max of |z| over 2048 entries: 5 standard errors is exceeded with probability < 1e-3
    assert z_mean.abs().max() < 5 and z_var.abs().max() < 5
    assert abs(z_mean.mean()) < 5 / math.sqrt(z_mean.numel())
    # the same seed gives the same sample; a weight sample is shared by every position of a sequence
    torch.testing.assert_close(layer.sample_delta(f, 3), samples[3])
    x = torch.randn(2, 5, layer.in_features)
    layer.noise_seed = 11
    with torch.no_grad():
        y = layer(x) - layer.base_layer(x)
    layer.noise_seed = None
    torch.testing.assert_close(y, x @ layer.sample_delta(f, 11).T, atol=1e-5, rtol=1e-5)


# --- the inner loop ----------------------------------------------------------------------------------
def test_inner_steps_lower_the_support_loss(toy_examples):
    config = make_config(**{"inner.inner_lr": 0.5, "lora.targets": "all-linear"})
    model, scorer = adapted_tiny(config)
    losses: list[float] = []
    adapt(
        model,
        prior(model),
        toy_examples,
        scorer,
        steps=8,
        lr=0.2,
        beta=config.objective.beta,
        seeds=lambda k: [1000 + k],
        micro_batch_size=4,
        losses=losses,
    )
    assert len(losses) == 9  # before each of the 8 steps, then after the last one
    assert losses[-1] < losses[-2] < losses[0] - 0.1, losses


def test_backtracking_undoes_a_step_that_overshoots_on_the_kl_curvature(toy_examples):
    """Eq. 7c. Where σθ is small the KL's curvature β/σθ² makes plain SGD overshoot: the support loss rises to
    10¹⁰ and on to NaN. With backtracking each such step is taken again at half the size and the loss stays bounded;
    where nothing overshoots (β = 0 here) the two loops are the same."""
    config = make_config(**{"lora.sigma_init": 1e-5, "objective.beta": 1e-6})
    model, scorer = adapted_tiny(config)
    theta = prior(model)
    _perturb({k: v for k, v in theta.items() if "mu_" in k}, seed=0)  # μθ ≠ 0: the inner loop moves μφ off it

    def run(backtrack, beta=1e-6):
        losses: list[float] = []
        phi = adapt(model, theta, toy_examples, scorer, steps=8, lr=0.1, beta=beta, seeds=lambda k: [1000 + k],
                    micro_batch_size=4, losses=losses, sigma_lr=10.0, backtrack=backtrack)  # fmt: skip
        return phi, losses

    _, plain = run(None)
    assert not all(math.isfinite(x) and x < 1e3 for x in plain), plain  # it overshoots without backtracking
    phi, guarded = run(1.25)
    steps = zip(guarded, guarded[1:], strict=False)
    assert all(math.isfinite(b) and b <= 1.25 * a for a, b in steps), guarded  # every step
    assert any(not torch.equal(phi[k], theta[k]) for k in phi)  # and it moved
    (phi_a, a), (phi_b, b) = run(None, beta=0.0), run(1.25, beta=0.0)
    assert a == b and all(torch.equal(phi_a[k], phi_b[k]) for k in phi_a)


def _episode(examples):
    return Episode("toy", examples[:6], examples[6:])


@pytest.mark.parametrize("order", ["first_order", "straight_through_kl"])
def test_first_order_gradient_equals_hand_reference(toy_examples, order):
    """first_order: ∂NLL/∂φᴷ straight to θ, plus β ∂KL/∂θ at φᴷ held fixed (empirical Bayes);
    straight_through_kl: ∂/∂φᴷ of NLL + β KL straight to θ, plus β ∂KL/∂θ."""
    config = make_config(**{"objective.beta": 1e-3, "inner.inner_lr": 0.3, "inner.order": order})
    model, scorer = adapted_tiny(config)
    method = ABMLL(model, scorer, config)
    _perturb(method.theta, 6)
    episode = _episode(toy_examples)
    for p in method.theta.values():
        p.grad = torch.zeros_like(p)
    method.task_gradient(episode, step=0, task_index=0, weight=1.0)
    got = {k: p.grad.clone() for k, p in method.theta.items()}

    # Reference on copies: φᴷ from the same ε, then the partials ∂/∂φ and ∂/∂θ.
    from abmll.methods.template import INNER

    phi_k = method.inner_loop(episode.support, lambda k: method.seeds(INNER, 0, 0, k, count=1), 2)
    phi = {k: v.detach().clone().requires_grad_() for k, v in phi_k.items()}
    theta = {k: v.detach().clone().requires_grad_() for k, v in method.theta.items()}
    (seed,) = method.seeds(OUTER, 0, 0, count=1)
    with posterior(model, phi), weight_sample(model, seed):
        nll = scorer.nll(model, episode.query)
    kl = 1e-3 * kl_divergence(phi, theta, method.layers)
    g_phi = torch.autograd.grad(
        nll + kl if order == "straight_through_kl" else nll, list(phi.values()), retain_graph=True
    )
    g_theta = torch.autograd.grad(kl, list(theta.values()))
    for key, gp, gt in zip(phi, g_phi, g_theta, strict=True):
        expected = gp + gt  # float32 sums in another order: tolerance relative to the largest entry
        torch.testing.assert_close(got[key], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_kl_pull_on_the_prior_mean_is_the_direct_partial_and_cancels_when_sent_straight_through():
    """The KL's gradient on μθ: with the first-order (empirical-Bayes) estimator it is the analytic direct partial
    ∂KL/∂μθ = (μθ − μφ)/σθ² carried to the factors (∂/∂B_μ = s·G A_μᵀ, ∂/∂A_μ = s·B_μᵀ G); with
    straight_through_kl the φ- and θ-partials of the mean cancel: exactly on the dense μ, and up to second order in
    φᴷ − θ on the factors."""
    from abmll.objectives import outer_kl_backward

    pulls = {}
    for order in ("first_order", "straight_through_kl"):
        config = make_config()
        model, _ = adapted_tiny(config)
        theta = prior(model)
        _perturb(theta, 11)
        phi = {k: v.detach().clone() for k, v in theta.items()}
        _perturb(phi, 12, scale=1e-4)  # an adapted posterior near the prior, as after a few inner steps
        phi_st = {k: theta[k] + (phi[k] - theta[k]).detach() for k in theta}
        for p in theta.values():
            p.grad = None
        layers = bayes_layers(model)
        outer_kl_backward(phi if order == "first_order" else phi_st, theta, layers, 1.0, order)
        pulls[order] = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in theta.items()}
        if order == "first_order":
            for name, layer in layers.items():
                f = {n: theta[f"{name}.{n}"].detach() for n in ("mu_A", "mu_B", "sigma_A", "sigma_B", "sigma_scale")}
                q = {n: phi[f"{name}.{n}"] for n in f}
                G = (layer.mean(f) - layer.mean(q)) / layer.sigma(f).square()
                for factor, expected in (("mu_B", G @ f["mu_A"].T), ("mu_A", f["mu_B"].T @ G)):
                    expected = layer.scaling * expected
                    atol = 1e-5 * float(expected.abs().max())
                    torch.testing.assert_close(pulls[order][f"{name}.{factor}"], expected, rtol=1e-4, atol=atol)
    mean_keys = [k for k in pulls["first_order"] if k.endswith(("mu_A", "mu_B"))]
    first = torch.cat([pulls["first_order"][k].flatten() for k in mean_keys])
    straight = torch.cat([pulls["straight_through_kl"][k].flatten() for k in mean_keys])
    assert first.norm() > 0
    assert straight.norm() <= 1e-2 * first.norm()


def test_second_order_gradient_reaches_theta_and_differs_from_first_order(toy_examples):
    grads = {}
    for order in ("first_order", "second_order"):
        config = make_config(**{"inner.order": order, "inner.inner_lr": 0.5, "objective.beta": 1e-4})
        model, scorer = adapted_tiny(config)
        method = ABMLL(model, scorer, config)
        _perturb(method.theta, 7)
        for p in method.theta.values():
            p.grad = torch.zeros_like(p)
        method.task_gradient(_episode(toy_examples), step=0, task_index=0, weight=1.0)
        grads[order] = torch.cat([p.grad.flatten() for p in method.theta.values()])
    first, second = grads["first_order"], grads["second_order"]
    assert torch.isfinite(second).all() and second.abs().sum() > 0
    assert (first - second).norm() > 1e-3 * first.norm()


class _SavedBytes:
    """Tracks the bytes of tensors saved for backward that are alive at once (graph memory)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def __enter__(self):
        tracker = self

        class Holder:
            def __init__(self, t: torch.Tensor) -> None:
                self.t, self.n = t, t.numel() * t.element_size()
                tracker.live += self.n
                tracker.peak = max(tracker.peak, tracker.live)

            def __del__(self) -> None:
                tracker.live -= self.n

        self._ctx = torch.autograd.graph.saved_tensors_hooks(Holder, lambda h: h.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def test_first_order_graph_memory_is_flat_in_k_and_second_order_grows(toy_examples):
    peaks: dict[tuple[str, int], int] = {}
    for order in ("first_order", "second_order"):
        for k in (1, 2, 4):
            config = make_config(**{"inner.order": order, "inner.inner_steps": k})
            model, scorer = adapted_tiny(config)
            method = ABMLL(model, scorer, config)
            with _SavedBytes() as saved:
                method.meta_step([_episode(toy_examples)])
            peaks[(order, k)] = saved.peak
    first = [peaks[("first_order", k)] for k in (1, 2, 4)]
    second = [peaks[("second_order", k)] for k in (1, 2, 4)]
    assert max(first) == min(first), first
    assert second[0] < second[1] < second[2], second
    assert second[2] > 2 * first[2]


# --- meta-learning signal ----------------------------------------------------------------------------
def _query_nll(method, episode, seed=0) -> float:
    phi = method.adapt(episode.support, seed)
    probs = method.predict(phi, episode.query, seed)
    gold = torch.tensor([ex.gold for ex in episode.query])
    return float(-torch.log(probs[torch.arange(len(gold)), gold]).mean())


def test_meta_training_beats_adapting_a_fresh_lora_on_held_out_tasks():
    """Tasks share one rule (the gold option is a 'good' word); each task shows two (good, bad) pairs.
    Held-out tasks recombine the words into pairs never seen together."""
    pairs = list(zip(GOOD, BAD, strict=True))
    train_tasks = [family_task(f"train{i}", pairs[2 * i : 2 * i + 2], 24, seed=i) for i in range(4)]
    held_out = [
        family_task("heldout0", [(GOOD[0], BAD[5]), (GOOD[3], BAD[6])], 40, seed=10),
        family_task("heldout1", [(GOOD[7], BAD[1]), (GOOD[2], BAD[4])], 40, seed=11),
    ]
    config = make_config(
        **{
            "lora.targets": "all-linear",
            "inner.inner_lr": 0.05,
            "meta.outer_lr": 1e-2,
            "meta.meta_steps": 40,
            "objective.gamma": None,  # the paper's v2 form: one β on the KL and the hyperprior
            "predict.mode": "mean",
        }
    )
    fresh_model, scorer = adapted_tiny(config, seed=0)
    fresh = ABMLL(fresh_model, scorer, config)
    model, scorer = adapted_tiny(config, seed=0)
    method = ABMLL(model, scorer, config)
    logs: list[dict] = []
    method.meta_train(
        MetaBatchSampler(train_tasks, k=8, query_size=8, meta_batch_size=2, seed=0), log=logs.append
    )
    assert len(logs) == 40 and all(math.isfinite(r["outer_nll"]) for r in logs)
    for task in held_out:
        from abmll.tasks.data import make_episode

        episode = make_episode(task, k=8, seed=100, query_size=32)
        before, after = _query_nll(fresh, episode), _query_nll(method, episode)
        assert after < before - 0.15, (task.name, before, after)


# --- save and load -----------------------------------------------------------------------------------
def test_save_load_gives_identical_predictions(tmp_path, toy_examples):
    config = make_config()
    model, scorer = adapted_tiny(config)
    method = ABMLL(model, scorer, config)
    method.meta_step([_episode(toy_examples)])
    save_checkpoint(tmp_path / "ckpt", method.state_dict(), config, {"method": "abmll", "model": "tiny"})
    expected = method.predict(method.adapt(toy_examples[:6], 1), toy_examples[6:], 1)

    model2, scorer2 = adapted_tiny(config, seed=0)
    _perturb(prior(model2), 9)  # anything: it is overwritten
    ckpt = load_prior_into(model2, tmp_path / "ckpt")
    method2 = ABMLL(model2, scorer2, ckpt["config"])
    got = method2.predict(method2.adapt(toy_examples[:6], 1), toy_examples[6:], 1)
    assert torch.equal(got, expected)


def test_a_checkpoint_without_the_log_scale_loads_with_lambda_zero(tmp_path, toy_examples):
    """Checkpoints written before λ (``sigma_scale``) existed hold four factors per layer; they load with λ = 0,
    the σ = g(B_σ A_σ + o) + c they were trained with, and predict as a model whose λ is 0."""
    config = make_config()
    model, scorer = adapted_tiny(config)
    method = ABMLL(model, scorer, config)
    method.meta_step([_episode(toy_examples)])
    with torch.no_grad():
        for key, p in method.theta.items():
            if key.endswith("sigma_scale"):
                p.zero_()
    old = {k: v for k, v in method.state_dict().items() if not k.endswith("sigma_scale")}
    save_checkpoint(tmp_path / "old", old, config, {"method": "abmll", "model": "tiny"})
    expected = method.predict(method.adapt(toy_examples[:6], 1), toy_examples[6:], 1)

    model2, scorer2 = adapted_tiny(config, seed=0)
    _perturb(prior(model2), 9)  # λ ≠ 0 before loading
    ckpt = load_prior_into(model2, tmp_path / "old")
    assert all(float(v) == 0.0 for k, v in prior(model2).items() if k.endswith("sigma_scale"))
    method2 = ABMLL(model2, scorer2, ckpt["config"])
    assert torch.equal(method2.predict(method2.adapt(toy_examples[:6], 1), toy_examples[6:], 1), expected)


def test_loading_into_a_different_model_names_the_module(tmp_path):
    config = make_config()
    model, _ = adapted_tiny(config)
    save_checkpoint(tmp_path / "ckpt", prior(model), config, {"method": "abmll", "model": "tiny"})
    other, _ = adapted_tiny(make_config(**{"lora.targets": ["q_proj"]}))
    with pytest.raises(CheckpointError, match=r"module 'model\.layers\.0\.self_attn\.v_proj'"):
        load_prior_into(other, tmp_path / "ckpt")
    ranked, _ = adapted_tiny(make_config(**{"lora.rank": 4}))
    with pytest.raises(CheckpointError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' factor 'mu_A'"):
        load_prior_into(ranked, tmp_path / "ckpt")
