"""The synthetic task family (abmll.synthetic): seeded, its teachers ΔW_i = M + s ⊙ E_i act as specified, its
labels are samples of the teachers, and the named families meet their calibration targets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from abmll.bayes import inject
from abmll.bayes.inject import bayes_layers, clone_factors, posterior, prior, weight_sample
from abmll.config import ABMLLConfig
from abmll.synthetic import SyntheticFamily, predictive_kl


def test_same_seed_same_family_and_tasks():
    a, b = SyntheticFamily.named("spread", seed=3), SyntheticFamily.named("spread", seed=3)
    for (na, da), (nb, db) in zip(a.delta(5).items(), b.delta(5).items(), strict=True):
        assert na == nb and torch.equal(da, db)
    ta, tb = a.task(5, 24, seed=1), b.task(5, 24, seed=1)
    assert [(e.input, e.options, e.gold, e.id) for e in ta.examples] == [
        (e.input, e.options, e.gold, e.id) for e in tb.examples
    ]
    assert [e.input for e in a.probe(8)] == [e.input for e in b.probe(8)]
    # Every seed moves what it owns: the family seed M, the example seed the inputs, the task index E_i.
    other = SyntheticFamily.named("spread", seed=4)
    assert not torch.equal(a.delta()[a.layers[0]], other.delta()[a.layers[0]])
    assert [e.input for e in ta.examples] != [e.input for e in a.task(5, 24, seed=2).examples]
    assert not torch.equal(a.delta(5)[a.layers[0]], a.delta(6)[a.layers[0]])


def test_delta_is_mean_plus_spread_times_noise():
    """ΔW_i = M + s ⊙ E_i: M of rank r and entry scale m, E_i of unit entry variance, dense or of rank r_E."""
    dense = SyntheticFamily(spread=0.3, mean_scale=0.2, mean_rank=3)
    low = SyntheticFamily(spread=0.3, mean_scale=0.2, mean_rank=3, noise_rank=2)
    assert dense.layers == low.layers and len(dense.layers) == 4
    assert all(n.endswith(("q_proj", "v_proj")) for n in dense.layers)
    for name in dense.layers:
        mean = dense.delta()[name]
        assert int(torch.linalg.matrix_rank(mean)) == 3
        assert mean.std().item() == pytest.approx(0.2, rel=0.35)
        noise = (dense.delta(7)[name] - mean) / 0.3
        assert int(torch.linalg.matrix_rank(noise)) == min(noise.shape)
        assert noise.std().item() == pytest.approx(1.0, rel=0.15)
        low_noise = (low.delta(7)[name] - low.delta()[name]) / 0.3
        assert int(torch.linalg.matrix_rank(low_noise)) == 2
        assert torch.equal(low.delta()[name], mean)  # the same family seed draws the same M


def test_identical_family_has_one_teacher(synthetic_families):
    fam = synthetic_families["identical"]
    probe = fam.probe(32)
    mean = fam.probs(probe, fam.delta())
    for i in (0, 1, 17):
        assert all(torch.equal(d, m) for d, m in zip(fam.delta(i).values(), fam.delta().values(), strict=True))
        assert predictive_kl(mean, fam.probs(probe, fam.delta(i))) == pytest.approx(0.0, abs=1e-12)


def test_spread_family_teachers_differ(synthetic_families):
    fam = synthetic_families["spread"]
    probe = fam.probe(64)
    teachers = [fam.probs(probe, fam.delta(i)) for i in range(3)]
    for p, q in itertools.combinations(teachers, 2):
        assert predictive_kl(p, q) > 0.02


def test_teacher_leaves_base_model_untouched(synthetic_families):
    fam = synthetic_families["spread"]
    probe = fam.probe(16)
    before = fam.probs(probe)
    fam.probs(probe, fam.delta(2))
    assert torch.equal(fam.probs(probe), before)
    fresh, _ = fam.base_model()
    for (name, p), (_, q) in zip(fam._model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_library_adapter_at_mean_reproduces_mean_teacher(synthetic_families):
    """The teacher's ΔW lives where the library's adapters do: a Bayesian LoRA whose mean μ equals M (M has
    rank ≤ the adapter's rank) gives the mean teacher's option probabilities through the library's scorer."""
    fam = synthetic_families["spread"]
    config = ABMLLConfig()
    model, _ = fam.base_model()
    inject(model, config.lora)
    assert tuple(bayes_layers(model)) == fam.layers
    phi = clone_factors(prior(model), requires_grad=False)
    for name, m in fam.delta().items():
        U, S, Vh = torch.linalg.svd(m.double())
        r = fam.mean_rank
        B = torch.zeros(m.shape[0], config.lora.rank, dtype=torch.float64)
        A = torch.zeros(config.lora.rank, m.shape[1], dtype=torch.float64)
        B[:, :r], A[:r] = U[:, :r] * S[:r] / config.lora.scaling, Vh[:r]
        phi[f"{name}.mu_B"], phi[f"{name}.mu_A"] = B.float(), A.float()
    probe = fam.probe(32)
    with torch.no_grad(), posterior(model, phi), weight_sample(model, None):
        student = torch.softmax(fam.scorer(model, probe), -1)
    torch.testing.assert_close(student, fam.probs(probe, fam.delta()), atol=1e-4, rtol=0)
    assert predictive_kl(fam.probs(probe, fam.delta()), fam.probs(probe)) > 0.05  # and M does move it


def test_labels_are_samples_of_the_teacher(synthetic_families):
    fam = synthetic_families["spread"]
    n = 1500
    task = fam.task(4, n, seed=0)
    gold = torch.tensor([e.gold for e in task.examples])
    p = fam.probs(task.examples, fam.delta(4)).double()
    # Marginal frequencies match the mean teacher probability, within 4 standard errors.
    freq = torch.bincount(gold, minlength=fam.n_options).double() / n
    se = (p * (1 - p)).sum(0).sqrt() / n
    assert ((freq - p.mean(0)).abs() < 4 * se).all(), (freq, p.mean(0))
    # Per example too: the mean probability of the drawn label is E[Σ_o p_o²] (it would be E[max p] for argmax).
    p_gold = p.gather(1, gold[:, None])[:, 0]
    expected = (p**2).sum(1)
    sd = math.sqrt(float((p * p**2).sum(1).sub(expected**2).sum())) / n
    assert abs(float(p_gold.mean() - expected.mean())) < 4 * sd
    assert (gold != p.argmax(1)).float().mean() > 0.3  # sampled, not the argmax
    # The labels fit their own teacher better than the base model or another task's teacher.
    nll = {k: -float(q.gather(1, gold[:, None]).log().mean()) for k, q in (
        ("own", p), ("base", fam.probs(task.examples)), ("other", fam.probs(task.examples, fam.delta(5))),
    )}  # fmt: skip
    assert nll["own"] < nll["base"] and nll["own"] < nll["other"], nll


def test_calibration_targets(synthetic_families):
    """(a) the base model is far from the mean teacher; (b) the spread family's teachers differ from each other
    by more than the mean teacher differs from the base (s large); (c) labels are neither nearly deterministic
    nor uniform."""
    spread = synthetic_families["spread"]
    probe = spread.probe(256)
    base, mean = spread.probs(probe), spread.probs(probe, spread.delta())
    mean_to_base = predictive_kl(mean, base)
    assert mean_to_base > 0.1  # (a)
    teachers = [spread.probs(probe, spread.delta(i)) for i in range(4)]
    pairwise = [predictive_kl(p, q) for p, q in itertools.permutations(teachers, 2)]
    assert sum(pairwise) / len(pairwise) > 2 * mean_to_base  # (b)
    for fam in synthetic_families.values():  # (c)
        p = torch.cat([fam.probs(probe, fam.delta(i)) for i in range(2)])
        top = p.max(-1).values.mean().item()
        assert 1 / fam.n_options + 0.1 < top < 0.9, top
        assert p.min(-1).values.mean().item() > 0.001


def test_predictive_kl():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05]])
    q = torch.tensor([[0.25, 0.75, 0.0], [0.9, 0.05, 0.05]])
    assert predictive_kl(p, p) == 0.0
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2
    assert predictive_kl(p, q) == pytest.approx(expected, rel=1e-12)
    assert predictive_kl(q, p) != pytest.approx(predictive_kl(p, q))  # KL(teacher ‖ student), not symmetric


def test_named_and_invalid():
    assert SyntheticFamily.named("identical").spread == 0.0
    assert SyntheticFamily.named("spread").spread > 0
    assert SyntheticFamily.named("spread", seed=2, n_options=2).options == ("red red red red", "blue blue blue blue")
    with pytest.raises(ValueError, match="unknown synthetic family"):
        SyntheticFamily.named("nope")
    with pytest.raises(ValueError, match="n_options"):
        SyntheticFamily(n_options=1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The spread family written as a benchmark: 3 train, 1 dev and 2 test tasks of 24 examples."""
    from abmll.synthetic import write_benchmark

    root = tmp_path_factory.mktemp("bench")
    family = SyntheticFamily.named("spread")
    return family, write_benchmark(family, root / "bench", train=3, dev=1, test=2, examples=24)


def test_written_benchmark_holds_the_family_and_its_truth(written):
    import json

    from abmll.synthetic import SETTING_FILE, write_benchmark
    from abmll.tasks.readers import load_training_tasks, read_setting

    family, bench = written
    setting = read_setting(bench / "data" / "settings" / SETTING_FILE)
    assert setting == {
        "train": ["synthetic-0", "synthetic-1", "synthetic-2"], "dev": ["synthetic-3"],
        "test": ["synthetic-4", "synthetic-5"],
    }  # fmt: skip
    tasks, _ = load_training_tasks(bench / "data", setting["train"] + setting["test"])
    for task, index in zip(tasks, (0, 1, 2, 4, 5), strict=True):  # read back as written, labels and all
        again = family.task(index, 24)
        assert [(e.input, e.options, e.gold, e.id) for e in task.examples] == [
            (e.input, e.options, e.gold, e.id) for e in again.examples
        ]
    truth = [json.loads(line) for line in (bench / "truth.jsonl").read_text().splitlines()]
    assert {r["task"] for r in truth} == {"synthetic-3", "synthetic-4", "synthetic-5"} and len(truth) == 3 * 24
    row = next(r for r in truth if r["task"] == "synthetic-4")
    example = family.task(4, 24).examples[0]
    assert row["id"] == example.id
    assert row["teacher"] == pytest.approx(family.probs([example], family.delta(4))[0].tolist(), abs=1e-6)
    assert row["base"] == pytest.approx(family.probs([example])[0].tolist(), abs=1e-6)
    assert write_benchmark(family, bench, train=3, dev=1, test=2, examples=24) == bench  # the same: kept
    with pytest.raises(Exception, match="is not this synthetic benchmark"):
        write_benchmark(family, bench, train=4, dev=1, test=2, examples=24)
    assert not list(bench.parent.glob(".bench.*"))  # no temporary folder left behind


def test_the_harness_on_the_written_benchmark_scores_as_the_family(written, tmp_path):
    """abmll compare reads the written model and data like a user's; its zero-shot predictions are W0's, so its KL
    to the teachers equals the base reference; a predictor that is the teacher has KL 0."""
    import json

    from conftest import invoke, ok

    from abmll.synthetic import SETTING_FILE, truth_table

    _, bench = written
    out = tmp_path / "cmp"
    ok(invoke(
        "compare", "--methods", "zero-shot,lora-task", "--preset", "smoke", "--model", bench / "model", "--data",
        bench / "data", "--setting", bench / "data" / "settings" / SETTING_FILE, "--k", 4, "--device", "cpu",
        "--set", "scoring.length_norm=none", "--out", out,
    ))  # fmt: skip
    truth = {json.loads(line)["id"]: json.loads(line) for line in (bench / "truth.jsonl").read_text().splitlines()}
    oracle = out / "teacher" / "seed-100"
    oracle.mkdir(parents=True)
    zero_shot = out / "zero-shot" / "seed-100" / "predictions.jsonl"
    rows = [json.loads(line) for line in zero_shot.read_text().splitlines()]
    oracle.joinpath("predictions.jsonl").write_text(
        "".join(json.dumps({**r, "probs": truth[r["id"]]["teacher"]}) + "\n" for r in rows)
    )
    table = truth_table(bench, out, against="lora-task")
    zero, base = table["methods"]["zero-shot"], table["references"]["base"]
    assert set(zero["tasks"]) == {"synthetic-4", "synthetic-5"}
    for task, kl in zero["tasks"].items():
        assert kl == pytest.approx(base["tasks"][task], abs=1e-5) and kl > 0.05
    assert table["methods"]["teacher"]["mean"]["mean"] == pytest.approx(0, abs=1e-6)
    lora = table["methods"]["lora-task"]["tasks"]
    assert lora != pytest.approx(zero["tasks"], abs=1e-4)  # adapted: not W0
    paired = table["paired"]["zero-shot"]["mean"]
    assert paired == pytest.approx(sum(lora[t] - zero["tasks"][t] for t in lora) / 2)
    # Against the sampled labels: a task's NLL is the mean gold NLL of its queries, its ECE that of its one seed.
    from abmll.metrics import expected_calibration_error

    labels = table["labels"]
    for task in zero["tasks"]:
        mine = [r for r in rows if r["task"] == task]
        nll = sum(-math.log(r["probs"][r["gold"]]) for r in mine) / len(mine)
        assert labels["nll"]["methods"]["zero-shot"]["tasks"][task] == pytest.approx(nll)
        ece = expected_calibration_error([r["probs"] for r in mine], [r["gold"] for r in mine])
        assert labels["ece"]["methods"]["zero-shot"]["tasks"][task] == pytest.approx(ece)
    lora_nll, zero_nll = (labels["nll"]["methods"][m]["tasks"] for m in ("lora-task", "zero-shot"))
    assert labels["nll"]["paired"]["zero-shot"]["mean"] == pytest.approx(
        sum(lora_nll[t] - zero_nll[t] for t in lora_nll) / 2
    )
