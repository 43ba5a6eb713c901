"""``abmll plan``: exact parameter counts, and a memory estimate (a meta-step simulated on the meta device) within
20 % of the memory a real meta-step allocates.

The measured memory is the peak of the bytes torch's CPU allocator handed out during one meta-step and had not
yet taken back, above what was allocated before it (:func:`abmll.plan.measure_peak`: the allocation events of
``torch.profiler`` with ``profile_memory=True``). It counts allocations, not the resident set, so it does not
depend on the machine's load or on the C library's allocator; the Python objects and library buffers are not in
it (nor in the estimate). Compared: the estimate's ``step_rise`` (peak minus base weights, θ and AdamW's state,
which the first meta-step of a fresh method does not yet hold at its peak) against the first meta-step's peak.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import PAIRS, family_task
from typer.testing import CliRunner

from abmll.bayes import inject, prior
from abmll.cli import app
from abmll.config import ABMLLConfig, BayesLoRAConfig
from abmll.errors import ConfigError, ModelError
from abmll.methods import create_method
from abmll.plan import LiveBytes, format_bytes, load_config, measure_peak, meta_model, plan
from abmll.scoring import Scorer
from abmll.tasks.data import Episode, Example
from abmll.tiny import tiny_llama

TOLERANCE = 0.20


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _measured_vs_planned(model, tokenizer, examples, overrides: dict, gradient_checkpointing: bool = False):
    """(measured peak of a first meta-step, its plan) for one task whose support and query sets are
    ``examples`` (so that every forward pass has the same shape), in one micro-batch.

    The plan models the plain scoring path (one whole sequence per option), which is measured here; the shared-
    prefix path (the default) is measured too and must stay below the plan: the plan is its upper bound."""
    config = ABMLLConfig().override({"meta.micro_batch_size": len(examples), **overrides})
    shared = create_method("abmll", model, Scorer(tokenizer, config.scoring), config)
    config = config.override({"scoring.shared_prefix": False})
    method = create_method("abmll", model, Scorer(tokenizer, config.scoring), config)
    if gradient_checkpointing:
        from abmll.models import enable_gradient_checkpointing, eval_mode

        enable_gradient_checkpointing(model)
        eval_mode(model)
    enc = method.scorer.encode(examples)
    rows, seq_len = enc.input_ids.shape
    read_tokens = math.ceil(int(enc.read_mask.sum()) / rows)
    episode = Episode(task="t", support=examples, query=examples)
    measured = measure_peak(lambda: method.meta_step([episode]))
    measured_shared = measure_peak(lambda: shared.meta_step([episode]))
    estimate = plan(
        model.config,
        rank=config.lora.rank,
        targets=config.lora.targets,
        batch=rows,
        seq_len=seq_len,
        read_tokens=read_tokens,
        inner_steps=config.inner.inner_steps,
        samples=config.inner.inner_samples,
        order=config.inner.order,
        gradient_checkpointing=gradient_checkpointing,
    )
    assert 0 < measured_shared <= estimate.step_rise, (format_bytes(estimate.step_rise), measured_shared)
    return measured, estimate


# --- parameter counts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", "re:.*mlp\\.(gate|up)_proj", ["o_proj"]])
@pytest.mark.parametrize("rank", [1, 8])
def test_parameter_counts_are_exact_on_the_tiny_model(targets, rank):
    model, _ = tiny_llama()
    base, base_bytes = _count(model), _bytes(model)
    lora = BayesLoRAConfig(rank=rank, targets=targets)
    names = inject(model, lora)
    theta = sum(p.numel() for p in prior(model).values())
    result = plan(model.config, rank=rank, targets=targets, batch=2, seq_len=4, read_tokens=1)
    assert result.base_params == base
    assert result.memory["base_weights"] == base_bytes
    assert result.adapter_params == theta
    assert result.memory["theta"] == 4 * theta
    assert result.target_modules == len(names)
    assert sum(result.target_shapes.values()) == len(names)


@pytest.mark.parametrize(
    "name, base, hidden, kv, layers",
    [("llama3-8b", 8_030_261_248, 4096, 1024, 32), ("qwen2-7b", 7_615_616_512, 3584, 512, 28)],
)
def test_shipped_configs_have_the_public_parameter_counts(name, base, hidden, kv, layers):
    config, label = load_config(name)
    assert name in label
    model = meta_model(config, torch.bfloat16)
    assert _count(model) == base
    inject(model, BayesLoRAConfig(rank=8))
    theta = sum(p.numel() for p in prior(model).values())
    # q_proj [hidden → hidden] and v_proj [hidden → kv] per layer, four factors of rank 8 each and one log-scale λ
    assert theta == layers * 2 * 8 * ((hidden + hidden) + (hidden + kv)) + layers * 2


def test_config_sources(tmp_path):
    model, _ = tiny_llama()
    model.config.save_pretrained(tmp_path / "folder")
    from_folder, _ = load_config(tmp_path / "folder")
    from_file, _ = load_config(tmp_path / "folder" / "config.json")
    assert from_folder.hidden_size == from_file.hidden_size == 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ModelError, match="model_type"):
        load_config(other)
    with pytest.raises(ModelError, match="no config.json"):
        load_config(tmp_path)
    with pytest.raises(ModelError, match="no such file"):
        load_config(tmp_path / "missing" / "model")
    with pytest.raises(ConfigError, match="dtype"):
        plan(model.config, dtype="int8")
    with pytest.raises(ConfigError, match="read_tokens"):
        plan(model.config, seq_len=4, read_tokens=5)
    with pytest.raises(ModelError, match="no module of the model matches"):
        plan(model.config, targets=["nothing_here"])


# --- the memory counters ---------------------------------------------------------------------------------
def test_live_bytes_counts_new_storages_once_and_frees_them():
    base = torch.ones(10)
    with LiveBytes() as live:
        a = torch.empty(1000)  # 4000 bytes
        view = a[:10].t()  # a view: nothing new
        a.add_(1)  # in place: nothing new
        b = base * 2  # 40 bytes
        assert live.now == 4040
        del a, view
        assert live.now == 40
        del b
    assert live.now == 0 and live.peak == 4040


def test_measure_peak_sees_a_temporary():
    def work():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a + 1  # 4 MiB more
        del a
        return float(b.sum())

    assert 8 * 2**20 <= measure_peak(work) < 9 * 2**20


# --- the estimate against a measured meta-step ------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, checkpointing",
    [
        ({"inner.inner_steps": 2}, False),
        ({"inner.inner_steps": 3, "lora.targets": "all-linear", "lora.rank": 16}, False),
        ({"inner.inner_steps": 3, "inner.order": "second_order"}, False),
        ({"inner.inner_steps": 2, "inner.inner_samples": 2}, True),
    ],
    ids=["first-order", "all-linear", "second-order", "checkpointing"],
)
def test_estimate_is_within_20_percent_of_a_measured_meta_step_on_the_tiny_model(overrides, checkpointing):
    torch.manual_seed(0)
    model, tokenizer = tiny_llama()
    examples = family_task("t", PAIRS, 8, seed=0).examples
    measured, estimate = _measured_vs_planned(model, tokenizer, examples, overrides, checkpointing)
    assert measured > 0
    assert abs(estimate.step_rise / measured - 1) <= TOLERANCE, (format_bytes(estimate.step_rise), measured)


def test_first_order_memory_does_not_depend_on_inner_steps_and_samples_add_one_gradient_sum():
    model, _ = tiny_llama()
    plans = {
        (k, s): plan(model.config, batch=4, seq_len=8, read_tokens=1, inner_steps=k, samples=s)
        for k, s in ((2, 1), (5, 1), (5, 4))
    }
    peaks = {key: p.peak for key, p in plans.items()}
    assert peaks[(2, 1)] == peaks[(5, 1)]  # from K = 2 on: the previous φ that backtracking keeps is there at any K
    # several weight samples per inner step: the running sum of their gradients, at most a θ-sized buffer or two
    assert 0 <= peaks[(5, 4)] - peaks[(5, 1)] <= 2 * plans[(5, 4)].memory["theta"]
    second = [plan(model.config, batch=4, seq_len=8, read_tokens=1, inner_steps=k, order="second_order").peak
              for k in (1, 2)]
    assert second[1] > second[0] > plan(model.config, batch=4, seq_len=8, read_tokens=1, inner_steps=1).peak


# --- the command ------------------------------------------------------------------------------------------
def test_cli_plan_prints_tables_and_json(tmp_path):
    model, _ = tiny_llama()
    model.config.save_pretrained(tmp_path / "tiny")
    runner = CliRunner()
    args = ["plan", "--model", str(tmp_path / "tiny"), "--batch", "4", "--seq-len", "8", "--read-tokens", "1"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["base_params"] == _count(model)
    assert data["peak"] == data["persistent"] + max(data["phases"].values())
    assert set(data["memory"]) >= {"base_weights", "theta", "optimizer", "activations", "sampled_delta_w", "kl"}
    result = runner.invoke(app, args + ["--targets", "all-linear", "--rank", "4"])
    assert result.exit_code == 0, result.output
    for needle in ("Parameters (exact)", "Memory (estimated)", "base weights", "sampled ΔW", "peak"):
        assert needle in result.stdout
    bad = runner.invoke(app, args + ["--targets", "nothing_here"])
    assert bad.exit_code == 2 and "no module of the model matches" in bad.output


# --- the real model ---------------------------------------------------------------------------------------
QUESTIONS = [
    ("Question: Tom has three apples and eats one. How many apples are left?\nAnswer:", ("two", "three", "four")),
    ("Question: The sky on a clear day is\nAnswer:", ("green", "blue", "red")),
    ("Question: Ice that is left in the sun will\nAnswer:", ("freeze", "grow", "melt")),
    ("Question: A cat is a kind of\nAnswer:", ("animal", "plant", "stone")),
]
PASSAGE = (
    "Maya keeps a small garden behind her house. In spring she plants tomatoes, beans and sunflowers. Every "
    "morning she waters the plants before school, and on Saturdays she pulls the weeds with her little brother. "
    "By the end of summer the sunflowers are taller than the fence."
)
PASSAGE_QUESTIONS = [
    ("What does Maya plant in spring?", ("tomatoes, beans and sunflowers", "apples", "rice", "cactus")),
    ("When does Maya water the plants?", ("every morning", "at midnight", "never", "once a year")),
    ("Who helps Maya pull the weeds?", ("her little brother", "a teacher", "the mayor", "nobody")),
    ("What grows taller than the fence?", ("the sunflowers", "the beans", "the grass", "the house")),
]


def _smollm2_examples(kind: str) -> list[Example]:
    if kind == "short":  # 12 sequences of ~20 tokens: the dense weight sample and the KL dominate
        return [Example(q, opts, i % len(opts), id=f"q{i}") for i, (q, opts) in enumerate(QUESTIONS)]
    # 16 sequences of ~75 tokens: activations and attention weigh more
    return [
        Example(f"{PASSAGE}\nQuestion: {q}\nAnswer:", opts, 0, id=f"p{i}")
        for i, (q, opts) in enumerate(PASSAGE_QUESTIONS)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["short", "passage"])
def test_plan_on_smollm2_counts_exactly_and_is_within_20_percent(smollm2, kind):
    from abmll.models import load_model

    model, tokenizer = load_model(None)  # a fresh copy (the fixture's model is shared; this one gets an adapter)
    base, base_bytes = _count(model), _bytes(model)
    measured, estimate = _measured_vs_planned(model, tokenizer, _smollm2_examples(kind), {"inner.inner_steps": 1})
    assert estimate.base_params == base == 134_515_008
    assert estimate.memory["base_weights"] == base_bytes
    assert estimate.adapter_params == sum(p.numel() for p in prior(model).values())
    assert abs(estimate.step_rise / measured - 1) <= TOLERANCE, (format_bytes(estimate.step_rise), measured)
    if kind == "short":  # the plan reads the config alone: the same numbers from the embedded model's name
        by_name = plan(
            "smollm2-135m", batch=estimate.batch, seq_len=estimate.seq_len, read_tokens=estimate.read_tokens,
            inner_steps=1,
        )
        assert by_name.peak == estimate.peak


def test_the_bound_on_sigma_costs_no_memory():
    """Eq. 2b keeps no more for the backward pass than eq. 2 does (a log-space form kept three dense tensors a layer:
    the planned peak of an all-linear Llama3-8B meta-step rose from 154 to 206 GiB)."""
    model, _ = tiny_llama()
    shape = {"batch": 4, "seq_len": 8, "read_tokens": 1, "targets": "all-linear"}
    peaks = [plan(model.config, **shape, overrides={"lora.sigma_max": m}).peak for m in (None, 1.0)]
    assert peaks[1] <= peaks[0], peaks
