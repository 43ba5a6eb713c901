"""Interop with the Hugging Face ecosystem: the mean of θ (or of a task posterior φ) exported as a PEFT LoRA
adapter that PEFT's own loader runs with the logits of abmll's mean mode; the same mean merged into a model
folder that ``AutoModelForCausalLM`` reloads; a PEFT adapter imported as the prior mean reproducing its own
logits; the one-call loader; and the CLI commands with their bad-input errors. On the tiny random Llama, plus a
GPT-2 (Conv1D) model, plus the real SmolLM2-135M (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GOOD, PAIRS, family_task, invoke, make_config, ok, save_tiny, write_families
from safetensors.torch import load_file, save_file

import abmll
from abmll.bayes import bayes_layers, posterior, prior, weight_sample
from abmll.checkpoint import MANIFEST, PRIOR_FILE, save_checkpoint
from abmll.errors import CheckpointError, ConfigError, DataError
from abmll.interop import EXPORT_INFO, PEFT_CONFIG, PEFT_WEIGHTS, read_support
from abmll.methods import create_method
from abmll.scoring import Scorer
from abmll.tasks.data import Example, Task
from abmll.tasks.readers import write_metaicl_task, write_tsv
from abmll.tiny import tiny_llama

RANK = 4
#: alpha 16 / rank 4: abmll's s = 4; the imported PEFT adapters use other alphas to exercise the rescaling.
CONFIG = make_config(**{"lora.rank": RANK, "inner.test_inner_steps": 3, "inner.inner_lr": 0.5})
TEXTS = ["the cat sat on the table and the dog ran", "a big red boat on the river"]
TRAIN_TASKS = ["fam0", "fam1"]
ATOL = 1e-5


def one_error(result, *needles: str) -> str:
    """Exit status 2, no traceback, exactly one error line holding every needle."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def batch(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    return model(**batch(tokenizer)).logits


@torch.no_grad()
def mean_logits(model, tokenizer, phi=None) -> torch.Tensor:
    with posterior(model, phi), weight_sample(model, None):
        return model(**batch(tokenizer)).logits


def randomise_mean(model, seed: int, scale: float = 0.05) -> None:
    """Random B_μ (and a perturbed A_μ) so that μθ = s·B_μ A_μ is far from 0 and the comparisons are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in prior(model).items():
            if key.endswith(".mu_B"):
                p.copy_(scale * torch.randn(p.shape, generator=g))
            elif key.endswith(".mu_A"):
                p.add_(scale * torch.randn(p.shape, generator=g))


def assert_matches(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    """``got`` equals ``want`` within ATOL, and ``want`` is far from the base model's logits."""
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert (want - base).abs().max() > 100 * ATOL


def peft_logits(out: Path, tokenizer, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of PEFT's own loader on a fresh tiny Llama, logits of that base model alone)."""
    from peft import PeftModel

    base, _ = tiny_llama(seed=seed)
    before = logits(base, tokenizer)
    peft_model = PeftModel.from_pretrained(base, str(out))
    return logits(peft_model, tokenizer), before


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model folder, a checkpoint with a random μθ, a support file, and training data."""
    root = tmp_path_factory.mktemp("interop")
    save_tiny(root)
    model, tokenizer = tiny_llama(seed=0)  # the saved model: its weights depend only on the seed
    method = create_method("abmll", model, Scorer(tokenizer, CONFIG.scoring), CONFIG)
    randomise_mean(model, seed=1)
    save_checkpoint(root / "ckpt", method.state_dict(), CONFIG, {"method": "abmll", "model": str(root / "tiny")})
    support = family_task("support", PAIRS[:3], 8, seed=7)
    support_file = write_metaicl_task(support, root / "data", 8, 100, "train")
    write_families(root / "data", TRAIN_TASKS, 24)
    (root / "setting.json").write_text(json.dumps({"train": TRAIN_TASKS, "test": ["support"]}))
    (root / "fast.json").write_text(
        json.dumps({"lora": {"rank": RANK}, "inner": {"inner_steps": 1}, "meta": {"support_size": 8, "query_size": 8}})
    )
    return {"root": root, "model": root / "tiny", "ckpt": root / "ckpt", "support": support_file}


@pytest.fixture
def loaded(env):
    """``abmll.load`` of the checkpoint on its recorded model folder."""
    return abmll.load(env["ckpt"])


def make_peft_adapter(out: Path, r: int = RANK, alpha: float = 8, seed: int = 3, **extra) -> torch.Tensor:
    """A PEFT LoRA on q_proj/v_proj of the tiny Llama with random A and B, saved with PEFT's save_pretrained;
    returns the PeftModel's logits."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = tiny_llama(seed=0)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **extra)
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.eval()
    want = logits(peft_model, tokenizer)
    peft_model.save_pretrained(str(out))
    return want


# --------------------------------------------------------------------------------------------- PEFT export
def test_export_peft_of_the_prior_mean_runs_in_peft_with_the_mean_mode_logits(env, loaded, tmp_path):
    model, tokenizer, method = loaded
    assert method.name == "abmll" and method.config.lora.rank == RANK
    want = mean_logits(model, tokenizer)
    out = abmll.export_peft(model, tmp_path / "peft")

    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["lora_alpha"] == 16 and not config["use_rslora"]
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(env["model"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", EXPORT_INFO, PEFT_CONFIG, PEFT_WEIGHTS]  # no θ files
    assert json.loads((out / EXPORT_INFO).read_text())["mean"] == "prior"

    tensors = load_file(str(out / PEFT_WEIGHTS))
    expected_keys = {
        f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{f}.weight"
        for i in range(2)
        for m in "qv"
        for f in "AB"
    }
    assert set(tensors) == expected_keys
    theta = prior(model)
    for name in bayes_layers(model):
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], theta[f"{name}.mu_A"].detach())
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], theta[f"{name}.mu_B"].detach())

    got, base = peft_logits(out, tokenizer)
    assert_matches(got, want, base)


def test_export_peft_of_a_task_posterior_differs_from_the_prior_and_matches_peft(env, loaded, tmp_path):
    model, tokenizer, method = loaded
    phi = abmll.task_posterior(method, env["support"], seed=0)
    prior_out = abmll.export_peft(model, tmp_path / "prior")
    post_out = abmll.export_peft(model, tmp_path / "post", phi, info={"adapt_on": str(env["support"])})
    info = json.loads((post_out / EXPORT_INFO).read_text())
    assert info["mean"] == "posterior" and info["adapt_on"] == str(env["support"])

    prior_b = load_file(str(prior_out / PEFT_WEIGHTS))
    post_b = load_file(str(post_out / PEFT_WEIGHTS))
    delta = max((post_b[k] - prior_b[k]).abs().max().item() for k in prior_b if k.endswith("lora_B.weight"))
    assert delta > 1e-3  # K_test steps moved μ away from μθ

    want = mean_logits(model, tokenizer, phi)
    assert (want - mean_logits(model, tokenizer)).abs().max() > 100 * ATOL
    got, base = peft_logits(post_out, tokenizer)
    assert_matches(got, want, base)
    # The same support set and seed give the same posterior (adaptation is deterministic).
    again = abmll.task_posterior(method, read_support(env["support"]), seed=0)
    assert all(torch.equal(again[k], phi[k]) for k in phi)


def test_export_peft_of_gpt2_conv1d_layers(tmp_path):
    """GPT-2's Conv1D stores its weight transposed: the export sets fan_in_fan_out and still matches PEFT,
    and the merged export transposes the update."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32)).eval()

    ids = {"input_ids": torch.arange(12)[None]}
    model = gpt2()
    abmll.inject(model, make_config(**{"lora.targets": ["c_attn", "c_fc"], "lora.rank": 2}).lora)
    randomise_mean(model, seed=4)
    with torch.no_grad(), weight_sample(model, None):
        want = model(**ids).logits
    out = abmll.export_peft(model, tmp_path / "peft")
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["fan_in_fan_out"] and sorted(config["target_modules"]) == ["c_attn", "c_fc"]
    base = gpt2()
    with torch.no_grad():
        before = base(**ids).logits
        got = PeftModel.from_pretrained(base, str(out))(**ids).logits
    assert_matches(got, want, before)

    from abmll.tiny import tiny_tokenizer

    merged_out = abmll.export_merged(model, tiny_tokenizer(), tmp_path / "merged")
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(merged_out, dtype=torch.float32).eval()(**ids).logits
    assert_matches(reloaded, want, before)


def test_targets_that_suffixes_cannot_select_are_written_as_a_regex(tmp_path):
    """Only layer 1's q_proj is adapted: the suffix 'q_proj' would also select layer 0's, so the export writes
    a regex of the full module names, and PEFT adapts exactly that module."""
    from peft import PeftModel

    model, tokenizer = tiny_llama(seed=0)
    abmll.inject(model, make_config(**{"lora.targets": r"re:model\.layers\.1\.self_attn\.q_proj"}).lora)
    randomise_mean(model, seed=5)
    want = mean_logits(model, tokenizer)
    out = abmll.export_peft(model, tmp_path / "peft")
    target = json.loads((out / PEFT_CONFIG).read_text())["target_modules"]
    assert isinstance(target, str)
    base, _ = tiny_llama(seed=0)
    before = logits(base, tokenizer)
    peft_model = PeftModel.from_pretrained(base, str(out))
    adapted = [n for n, m in peft_model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    assert adapted == ["base_model.model.model.layers.1.self_attn.q_proj"]
    assert_matches(logits(peft_model, tokenizer), want, before)


# ------------------------------------------------------------------------------------------- merged export
def test_export_merged_reloads_with_automodel_and_leaves_the_model_as_it_was(env, loaded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, method = loaded
    phi = abmll.task_posterior(method, env["support"], seed=0)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = logits(tiny_llama(seed=0)[0], tokenizer)
    for name, adapted in (("prior", None), ("post", phi)):
        want = mean_logits(model, tokenizer, adapted)
        out = abmll.export_merged(model, tokenizer, tmp_path / name, adapted)
        assert (out / "config.json").is_file() and json.loads((out / EXPORT_INFO).read_text())["kind"] == "merged"
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert not any("abmll" in n or "base_layer" in n for n, _ in reloaded.named_parameters())
        tok = AutoTokenizer.from_pretrained(out)
        assert tok(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
        assert_matches(logits(reloaded, tok), want, base)
    # The in-memory model still has its Bayesian LoRA layers and its exact base weights.
    assert len(bayes_layers(model)) == 4
    after = dict(model.named_parameters())
    assert after.keys() == weights_before.keys()
    assert all(torch.equal(after[n], weights_before[n]) for n in weights_before)


# ---------------------------------------------------------------------------------------------- PEFT import
@pytest.mark.parametrize(("alpha", "rslora"), [(8, False), (16, False), (6, True)], ids=["alpha8", "same", "rslora"])
def test_imported_peft_adapter_reproduces_its_own_logits_at_step_0(tmp_path, alpha, rslora):
    want = make_peft_adapter(tmp_path / "adapter", alpha=alpha, use_rslora=rslora)
    model, tokenizer = tiny_llama(seed=0)
    method = create_method("abmll", model, Scorer(tokenizer, CONFIG.scoring), CONFIG)
    sigma_before = {k: v.detach().clone() for k, v in prior(model).items() if ".sigma_" in k}
    base = logits(tiny_llama(seed=0)[0], tokenizer)
    config = abmll.import_peft(model, tmp_path / "adapter")
    assert config["r"] == RANK and method.step == 0
    assert_matches(mean_logits(model, tokenizer), want, base)
    assert all(torch.equal(prior(model)[k], v) for k, v in sigma_before.items())  # σθ untouched
    assert all(torch.equal(method.theta[k], v) for k, v in prior(model).items())  # the method's θ is the model's


def test_export_then_import_round_trips_the_mean_exactly(loaded, tmp_path):
    model, tokenizer, _ = loaded
    out = abmll.export_peft(model, tmp_path / "peft")
    fresh, _ = tiny_llama(seed=0)
    create_method("abmll", fresh, Scorer(tokenizer, CONFIG.scoring), CONFIG)
    abmll.import_peft(fresh, out)
    theta, got = prior(model), prior(fresh)
    for key in theta:
        if ".mu_" in key:
            assert torch.equal(got[key], theta[key]), key


def _edit_config(**fields):
    def apply(folder: Path) -> None:
        path = folder / PEFT_CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return apply


def _extra_tensor(folder: Path) -> None:
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 8)
    save_file(tensors, str(folder / PEFT_WEIGHTS))


def _drop_module(folder: Path) -> None:
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj" not in k}, str(folder / PEFT_WEIGHTS))


IMPORT_ERRORS = [
    ("rank", dict(r=2), None, ["has rank r = 2", "lora.rank = 4", "--set lora.rank=2"]),
    ("extra-target", dict(targets=["q_proj", "k_proj", "v_proj"]), None,
     ["adapts module 'model.layers.0.self_attn.k_proj'", "'k_proj'", "lora.targets"]),
    ("missing-module", {}, _drop_module, ["'model.layers.1.self_attn.v_proj'", "has no LoRA factors"]),
    ("dora", {}, _edit_config(use_dora=True), ["'use_dora' = True", "not supported"]),
    ("not-lora", {}, _edit_config(peft_type="IA3"), ["peft_type is 'IA3'", "only LoRA"]),
    ("foreign-tensor", {}, _extra_tensor, ["lora_embedding_A", "not a LoRA factor"]),
    ("no-weights", {}, lambda f: (f / PEFT_WEIGHTS).unlink(), [f"no {PEFT_WEIGHTS}"]),
    ("pickle-only", {}, lambda f: (f / PEFT_WEIGHTS).rename(f / "adapter_model.bin"), ["pickle", "never read"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "alter", "needles"), [c[1:] for c in IMPORT_ERRORS], ids=[c[0] for c in IMPORT_ERRORS]
)
def test_import_peft_names_what_does_not_fit(tmp_path, make, alter, needles):
    kwargs = dict(make)
    targets = kwargs.pop("targets", None)
    if targets is None:
        make_peft_adapter(tmp_path / "adapter", **kwargs)
    else:
        _make_with_targets(tmp_path / "adapter", targets)
    if alter is not None:
        alter(tmp_path / "adapter")
    model, tokenizer = tiny_llama(seed=0)
    create_method("abmll", model, Scorer(tokenizer, CONFIG.scoring), CONFIG)
    mu_before = {k: v.detach().clone() for k, v in prior(model).items()}
    with pytest.raises(CheckpointError) as info:
        abmll.import_peft(model, tmp_path / "adapter")
    for needle in needles:
        assert needle in str(info.value)
    assert all(torch.equal(prior(model)[k], v) for k, v in mu_before.items())  # nothing half-imported


def _make_with_targets(out: Path, targets: list[str]) -> None:
    from peft import LoraConfig, get_peft_model

    base, _ = tiny_llama(seed=0)
    get_peft_model(base, LoraConfig(r=RANK, lora_alpha=8, target_modules=targets)).save_pretrained(str(out))


def test_import_refuses_an_abmll_checkpoint_and_load_refuses_a_peft_folder(env, loaded, tmp_path):
    model, _, _ = loaded
    with pytest.raises(CheckpointError, match="is an abmll checkpoint, not a PEFT adapter"):
        abmll.import_peft(model, env["ckpt"])
    out = abmll.export_peft(model, tmp_path / "peft")
    with pytest.raises(CheckpointError, match="is a PEFT adapter, not an abmll checkpoint"):
        abmll.load(out)
    with pytest.raises(CheckpointError, match="does not exist"):
        abmll.import_peft(model, tmp_path / "nope")


# ------------------------------------------------------------------------------------------ one-call loader
def test_load_gives_model_tokenizer_and_method_with_theta(env, tmp_path):
    from abmll.checkpoint import load_checkpoint

    model, tokenizer, method = abmll.load(env["ckpt"], overrides={"inner.test_inner_steps": 1})
    saved = load_checkpoint(env["ckpt"])["theta"]
    assert all(torch.equal(method.theta[k].detach(), saved[k]) for k in saved)
    assert method.config.inner.test_inner_steps == 1 and method.config.lora.rank == RANK
    assert tokenizer(TEXTS[0])["input_ids"] and not model.training

    # An already loaded model (with its tokenizer) and another method name.
    mine, tok = tiny_llama(seed=0)
    same, _, icl = abmll.load(env["ckpt"], mine, tok, method="abmll-icl")
    assert same is mine and icl.name == "abmll-icl"
    torch.testing.assert_close(mean_logits(mine, tok), mean_logits(model, tokenizer), rtol=0, atol=0)

    with pytest.raises(ConfigError, match="pass the tokenizer"):
        abmll.load(env["ckpt"], tiny_llama(seed=0)[0])
    with pytest.raises(ConfigError, match="runs on the base model alone"):
        abmll.load(env["ckpt"], method="zero-shot")
    with pytest.raises(CheckpointError, match="has shape"):
        abmll.load(env["ckpt"], overrides={"lora.rank": 2})


def test_read_support_takes_metaicl_jsonl_and_crossfit_tsv(env, tmp_path):
    examples = read_support(env["support"])
    assert len(examples) == 8 and all(isinstance(e, Example) for e in examples)
    rows = [Example(f"the {w} sat", ("yes", "no"), i % 2, id=f"cls:{i}") for i, w in enumerate(GOOD)]
    task = Task("cls", rows, kind="classification")
    tsv = write_tsv(task, tmp_path / "cls" / "cls_train.tsv")
    assert [(e.input, e.answer) for e in read_support(tsv)] == [(e.input, e.answer) for e in task.examples]
    with pytest.raises(DataError, match="does not exist"):
        read_support(tmp_path / "none.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="expected a MetaICL .jsonl file or a CrossFit .tsv file"):
        read_support(tmp_path / "x.csv")


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_export_peft_prior_and_posterior(env, tmp_path):
    _, tokenizer = tiny_llama(seed=0)
    model, _, method = abmll.load(env["ckpt"])
    want_prior = mean_logits(model, tokenizer)
    phi = abmll.task_posterior(method, env["support"], seed=5)
    want_post = mean_logits(model, tokenizer, phi)

    out = tmp_path / "peft"
    ok(invoke("export-peft", "--checkpoint", env["ckpt"], "--out", out, "--device", "cpu"))
    got, base = peft_logits(out, tokenizer)
    assert_matches(got, want_prior, base)

    # Exporting again into an earlier export replaces it; --adapt-on exports the task posterior mean.
    result = invoke(
        "export-peft", "--checkpoint", env["ckpt"], "--out", out, "--adapt-on", env["support"], "--seed", 5,
        "--device", "cpu",
    )  # fmt: skip
    ok(result)
    assert "posterior" in result.output
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["mean"] == "posterior" and info["adapt_on"] == str(env["support"]) and info["seed"] == 5
    got, base = peft_logits(out, tokenizer)
    assert_matches(got, want_post, base)
    assert (want_post - want_prior).abs().max() > 100 * ATOL


def test_cli_export_merged(env, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = abmll.load(env["ckpt"])
    want = mean_logits(model, tokenizer)
    out = tmp_path / "merged"
    ok(invoke("export-merged", "--checkpoint", env["ckpt"], "--out", out, "--device", "cpu"))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_matches(logits(reloaded, tokenizer), want, logits(tiny_llama(seed=0)[0], tokenizer))


def test_cli_train_init_peft_starts_from_the_adapter(env, tmp_path):
    want = make_peft_adapter(tmp_path / "adapter", alpha=8)
    run = tmp_path / "run"
    argv = [
        "train", "--model", env["model"], "--data", env["root"] / "data", "--setting", env["root"] / "setting.json",
        "--config", env["root"] / "fast.json", "--init-peft", tmp_path / "adapter", "--device", "cpu",
    ]  # fmt: skip
    ok(invoke(*argv, "--out", run, "--steps", 0))
    from abmll.checkpoint import load_checkpoint

    assert load_checkpoint(run / "final", trainer=True)["trainer_values"]["step"] == 0
    assert json.loads((run / "config.json").read_text())["init_peft"] == str(tmp_path / "adapter")
    model, tokenizer, method = abmll.load(run / "final")
    assert_matches(mean_logits(model, tokenizer), want, logits(tiny_llama(seed=0)[0], tokenizer))

    # Meta-training then moves on from the imported mean (one step changes θ).
    ok(invoke(*argv, "--out", tmp_path / "run1", "--steps", 1))
    _, _, trained = abmll.load(tmp_path / "run1" / "final")
    assert any(not torch.equal(trained.theta[k], method.theta[k]) for k in method.theta)


def _peft_folder(env, tmp_path) -> Path:
    make_peft_adapter(tmp_path / "adapter")
    return tmp_path / "adapter"


CLI_ERRORS = [
    ("export-peft-missing-checkpoint",
     lambda env, t: ["export-peft", "--checkpoint", t / "no-ckpt", "--out", t / "out"], ["no-ckpt", "does not exist"]),
    ("export-merged-missing-checkpoint",
     lambda env, t: ["export-merged", "--checkpoint", t / "no-ckpt", "--out", t / "out"],
     ["no-ckpt", "does not exist"]),
    ("export-peft-missing-support",
     lambda env, t: ["export-peft", "--checkpoint", env["ckpt"], "--out", t / "out", "--adapt-on", t / "s.jsonl"],
     ["s.jsonl", "does not exist"]),
    ("export-over-a-checkpoint",
     lambda env, t: ["export-merged", "--checkpoint", env["ckpt"], "--out", env["ckpt"]],
     ["is not an earlier abmll export", "refusing to replace it"]),
    ("export-a-peft-folder",
     lambda env, t: ["export-peft", "--checkpoint", _peft_folder(env, t), "--out", t / "out"],
     ["is a PEFT adapter, not an abmll checkpoint"]),
    ("train-init-peft-rank-mismatch",
     lambda env, t: ["train", "--model", env["model"], "--data", env["root"] / "data", "--setting",
                     env["root"] / "setting.json", "--config", env["root"] / "fast.json", "--set", "lora.rank=2",
                     "--init-peft", _peft_folder(env, t), "--out", t / "out", "--steps", 0],
     ["has rank r = 4", "lora.rank = 2", "--set lora.rank=4"]),
    ("train-init-peft-missing",
     lambda env, t: ["train", "--model", env["model"], "--data", env["root"] / "data", "--setting",
                     env["root"] / "setting.json", "--config", env["root"] / "fast.json",
                     "--init-peft", t / "no-adapter", "--out", t / "out", "--steps", 0],
     ["no-adapter", "does not exist"]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "needles"), [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_bad_input_gives_one_clear_error(env, tmp_path, args, needles):
    ckpt_files = sorted(p.name for p in env["ckpt"].iterdir())
    one_error(invoke(*args(env, tmp_path), "--device", "cpu"), *needles)
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "final").exists()
    assert not (tmp_path / "out" / PEFT_WEIGHTS).exists() and not (tmp_path / "out" / "config.json").exists()
    assert sorted(p.name for p in env["ckpt"].iterdir()) == ckpt_files  # the checkpoint was not touched
    assert (env["ckpt"] / MANIFEST).is_file() and (env["ckpt"] / PRIOR_FILE).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


# --------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_smollm2_peft_export_matches_the_mean_mode(tmp_path):
    """On the real SmolLM2-135M: a random μθ on q_proj/v_proj exported as a PEFT adapter gives, through PEFT's
    own loader on a fresh copy of the model, the logits of abmll's mean mode."""
    from peft import PeftModel

    from abmll.errors import AssetError
    from abmll.models import load_model

    try:
        model, tokenizer = load_model(None)
    except AssetError as exc:
        pytest.skip(f"the embedded SmolLM2-135M asset is absent and could not be fetched: {exc}")
    config = make_config()  # rank 8, alpha 16, q_proj and v_proj
    create_method("abmll", model, Scorer(tokenizer, config.scoring), config)
    randomise_mean(model, seed=6, scale=0.02)
    want = mean_logits(model, tokenizer)
    out = abmll.export_peft(model, tmp_path / "peft")
    assert json.loads((out / PEFT_CONFIG).read_text())["r"] == 8
    del model
    base, _ = load_model(None)
    before = logits(base, tokenizer)
    got = logits(PeftModel.from_pretrained(base, str(out)), tokenizer)
    assert_matches(got, want, before)


# ------------------------------------------------------------------------------------------------ model card
def test_exports_write_a_model_card_naming_the_base_weights_method_config_tasks_and_evaluation(env, tmp_path):
    from abmll.checkpoint import sha256
    from abmll.evaluation import write_results

    run = tmp_path / "run"
    argv = [
        "train", "--model", env["model"], "--data", env["root"] / "data", "--setting", env["root"] / "setting.json",
        "--config", env["root"] / "fast.json", "--device", "cpu", "--out", run, "--steps", 1,
    ]  # fmt: skip
    ok(invoke(*argv))
    rows = [{"task": "support", "seed": 1, "id": f"s:{i}", "gold": i % 2, "probs": [0.8, 0.2]} for i in range(6)]
    write_results(tmp_path / "eval", rows, {"method": "abmll", "model": str(env["model"]), "k": 8, "seeds": [1]})
    weights = sha256(env["model"] / "model.safetensors")

    for command, kind in (("export-peft", "peft"), ("export-merged", "transformers")):
        out = tmp_path / command
        ok(invoke(command, "--checkpoint", run / "final", "--out", out, "--device", "cpu",
                  "--results", tmp_path / "eval" / "results.json"))  # fmt: skip
        card = (out / "README.md").read_text()
        assert card.startswith("---\nbase_model: ") and f"library_name: {kind}" in card
        assert f"`model.safetensors` SHA-256 `{weights}`" in card and "belongs to exactly these base weights" in card
        assert "method: `abmll`" in card and f"meta-training tasks: {', '.join(TRAIN_TASKS)}" in card
        assert '"rank": 4' in card and "| support | 0.500 |" in card and "| **mean** |" in card
        info = json.loads((out / EXPORT_INFO).read_text())
        assert info["base_weights"]["files"] == {"model.safetensors": weights}
        assert info["train_tasks"] == TRAIN_TASKS

    # The library's export writes one too; a bad --results fails before anything is loaded or written.
    model, _, _ = abmll.load(env["ckpt"])
    card = (abmll.export_peft(model, tmp_path / "lib") / "README.md").read_text()
    assert "prior mean μθ" in card and "None given" in card
    (tmp_path / "bad.json").write_text("[1]")
    one_error(invoke("export-peft", "--checkpoint", run / "final", "--out", tmp_path / "never", "--results",
                     tmp_path / "bad.json", "--device", "cpu"), "bad.json", "expected a JSON object")  # fmt: skip
    assert not (tmp_path / "never").exists()
