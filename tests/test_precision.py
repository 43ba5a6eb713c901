"""The config's ``compute`` section on the tiny random Llama: bfloat16/float16 base weights and activations with
θ, σ, ε and the KL kept in float32; gradient checkpointing giving the gradients of a run without it (first and
second order); bitsandbytes quantisation refused with a clear error where it cannot run; and the section's
validation and (de)serialisation, including configs written before it existed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import PAIRS, adapted_tiny, family_task, make_config
from typer.testing import CliRunner

import abmll.inner
import abmll.methods.abmll
from abmll.bayes import bayes_layers
from abmll.config import ABMLLConfig
from abmll.errors import ConfigError, ModelError
from abmll.methods.abmll import ABMLL
from abmll.models import check_quantization, eval_mode, load_model
from abmll.tasks.data import Episode
from abmll.tiny import tiny_llama

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
GPU_QUANT = torch.cuda.is_available() and HAS_BNB
NO_GPU_QUANT_REASON = "4-bit/8-bit base layers need a CUDA GPU and the bitsandbytes package (not both available here)"


def _episodes() -> list[Episode]:
    ex = family_task("toy", PAIRS, 12, seed=0).examples
    return [Episode("a", ex[:6], ex[6:]), Episode("b", ex[6:], ex[:6])]


def _method(**overrides) -> ABMLL:
    # σ's factors take the mean's step size here: at σ = 0.05 the default α_σ = 10 moves log σ by tenths per inner
    # step, and the KL after the inner loop then differs by about 13 % between bfloat16 and float32 gradients.
    base = {"objective.beta": 1e-3, "lora.sigma_init": 0.05, "inner.inner_lr": 0.05, "inner.sigma_lr": None}
    config = make_config(**{**base, **overrides})
    model, scorer = adapted_tiny(config)
    method = ABMLL(model, scorer, config)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # move θ off its initialisation (μθ ≠ 0, σθ varying)
        for p in method.theta.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return method


def _flat_grad(method: ABMLL) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in method.theta.values()])


# ----------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_meta_step_is_close_to_float32_with_kl_in_float32(dtype, monkeypatch):
    kl_dtypes: list[torch.dtype] = []

    def recording(real):
        def kl(*args, **kwargs):
            out = real(*args, **kwargs)
            kl_dtypes.append(out.dtype)
            return out

        return kl

    monkeypatch.setattr(abmll.objectives, "kl_divergence", recording(abmll.objectives.kl_divergence))
    monkeypatch.setattr(abmll.inner, "kl_divergence", recording(abmll.inner.kl_divergence))

    reference = _method()
    ref = reference.meta_step(_episodes())
    low = _method(**{"compute.dtype": dtype})
    want = getattr(torch, dtype)
    model = low.model
    # the frozen base model is in the low dtype; θ (the optimiser's master weights) stays float32
    assert model.model.embed_tokens.weight.dtype == want and model.lm_head.weight.dtype == want
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == want
    adapter_outputs: list[torch.dtype] = []
    layer = bayes_layers(model)["model.layers.0.self_attn.q_proj"]
    handle = layer.register_forward_hook(lambda mod, args, out: adapter_outputs.append(out.dtype))
    kl_dtypes.clear()
    got = low.meta_step(_episodes())
    handle.remove()

    assert adapter_outputs and set(adapter_outputs) == {want}  # the forward pass runs in the low dtype …
    assert kl_dtypes and set(kl_dtypes) == {torch.float32}  # … the KL (inner and outer) in float32
    assert {p.dtype for p in low.theta.values()} == {torch.float32}
    assert {p.grad.dtype for p in low.theta.values()} == {torch.float32}
    assert {s.dtype for state in low.optimizer.state.values() for s in state.values() if s.dim()} == {torch.float32}
    factors = {k: v.detach() for k, v in layer.prior_factors().items()}
    assert layer.sigma(factors).dtype == torch.float32 and layer.noise(1, factors["mu_A"].device).dtype == torch.float32

    # close to float32 (measured: relative differences below 2e-3 on this model)
    assert got["outer_nll"] == pytest.approx(ref["outer_nll"], rel=1e-2)
    assert got["kl"] == pytest.approx(ref["kl"], rel=2e-2)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(_flat_grad(low), _flat_grad(reference), dim=0)
    assert cosine > 0.99, float(cosine)


def test_float32_compute_leaves_the_model_as_loaded():
    config = make_config()
    model, scorer = adapted_tiny(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ABMLL(model, scorer, config)
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)


# ----------------------------------------------------------------------------------- gradient checkpointing
class _Calls:
    """Counts forward calls of one attention module (a checkpointed layer's recomputation calls it again)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.n += 1


@pytest.mark.parametrize("order", ["first_order", "second_order"])
def test_gradient_checkpointing_gives_the_same_theta_gradient(order):
    grads, calls = {}, {}
    for checkpointing in (False, True):
        method = _method(**{"inner.order": order, "compute.gradient_checkpointing": checkpointing})
        counter = _Calls(method.model.model.layers[1].self_attn)
        for p in method.theta.values():
            p.grad = torch.zeros_like(p)
        method.task_gradient(_episodes()[0], step=0, task_index=0, weight=1.0)
        grads[checkpointing], calls[checkpointing] = _flat_grad(method), counter.n
    assert torch.isfinite(grads[False]).all() and grads[False].abs().sum() > 0
    # the checkpointed run recomputed the layer in its backward passes …
    assert calls[True] > calls[False], calls
    # … with the posterior and weight sample of the forward pass (second order replays the inner steps' too)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-6 * float(grads[False].abs().max()))


def test_gradient_checkpointing_survives_eval_mode_without_dropout():
    method = _method(**{"compute.gradient_checkpointing": True})
    model = method.model
    eval_mode(model)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing and layer.training for layer in layers)
    # nothing inside a decoder layer is in training mode (no dropout), nor is the model itself
    assert not model.training and not any(m.training for layer in layers for m in layer.modules() if m is not layer)
    record = method.meta_step(_episodes())  # meta_train's own eval_mode keeps it on too
    assert torch.isfinite(torch.tensor(record["outer_nll"]))


def test_train_in_bfloat16_from_the_launcher_with_checkpointing(tmp_path, monkeypatch):
    """``abmll train`` under ``accelerate launch`` with ``mixed_precision: bf16`` (ACCELERATE_MIXED_PRECISION) and
    gradient checkpointing: the run records bfloat16 and saves a float32 θ."""
    from safetensors.torch import load_file

    from abmll.checkpoint import PRIOR_FILE
    from abmll.cli import app
    from abmll.tasks.readers import write_metaicl_task

    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    for i in range(2):
        write_metaicl_task(family_task(f"fam{i}", PAIRS[i : i + 2], 12, seed=i), tmp_path / "data", 16384, 100, "train")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    result = CliRunner().invoke(app, [
        "train", "--model", str(tmp_path / "tiny"), "--data", str(tmp_path / "data"), "--tasks", "fam0,fam1",
        "--out", str(tmp_path / "out"), "--steps", "2", "--device", "cpu",
        "--set", "compute.gradient_checkpointing=true", "--set", "inner.inner_steps=1", "--set", "lora.rank=2",
        "--set", "meta.meta_batch_size=2", "--set", "meta.support_size=4", "--set", "meta.query_size=4",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["config"]["compute"] == {
        "dtype": "bfloat16", "gradient_checkpointing": True, "merge_without_grad": True, "quantization": "none"
    }
    assert saved["world_size"] == 1
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["outer_nll"] == r["outer_nll"] for r in log)  # not NaN
    theta = load_file(str(tmp_path / "out" / "final" / PRIOR_FILE))
    assert theta and {t.dtype for t in theta.values()} == {torch.float32}
    # an explicit --set compute.dtype wins over the launcher's mixed precision
    result = CliRunner().invoke(app, [
        "train", "--model", str(tmp_path / "tiny"), "--data", str(tmp_path / "data"), "--tasks", "fam0,fam1",
        "--out", str(tmp_path / "out32"), "--steps", "0", "--device", "cpu", "--set", "compute.dtype=float32",
        "--set", "meta.support_size=4", "--set", "meta.query_size=4",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out32" / "config.json").read_text())["config"]["compute"]["dtype"] == "float32"


# ------------------------------------------------------------------------------------------- quantisation
@pytest.mark.skipif(GPU_QUANT, reason="bitsandbytes and CUDA are both available: the error path does not apply")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantization_without_bitsandbytes_or_cuda_is_a_clear_error(bits, tmp_path):
    expected = "bitsandbytes" if not HAS_BNB else "CUDA"
    with pytest.raises(ModelError, match=rf"compute\.quantization = '{bits}' needs bitsandbytes and a CUDA GPU.*"):
        check_quantization(bits)
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ModelError, match=expected):
        load_model(tmp_path / "tiny", dtype="bfloat16", quantization=bits)
    # a method asked to use a quantised model refuses an unquantised one, with the same message here
    config = make_config(**{"compute.quantization": bits})
    model, scorer = adapted_tiny(config)
    with pytest.raises(ModelError, match=expected):
        ABMLL(model, scorer, config)


@pytest.mark.skipif(GPU_QUANT, reason="bitsandbytes and CUDA are both available: the error path does not apply")
def test_train_with_quantization_on_cpu_fails_with_one_line(tmp_path):
    from abmll.cli import app
    from abmll.tasks.readers import write_metaicl_task

    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    write_metaicl_task(family_task("fam", PAIRS, 12, seed=0), tmp_path / "data", 16384, 100, "train")
    result = CliRunner().invoke(app, [
        "train", "--model", str(tmp_path / "tiny"), "--data", str(tmp_path / "data"), "--tasks", "fam",
        "--out", str(tmp_path / "out"), "--set", "compute.quantization=4bit", "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "compute.quantization = '4bit' needs bitsandbytes and a CUDA GPU" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "final").exists()


@pytest.mark.skipif(not GPU_QUANT, reason=NO_GPU_QUANT_REASON)
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_layers_meta_train_on_gpu(bits, tmp_path):  # pragma: no cover - needs a CUDA GPU
    from abmll.methods import create_method
    from abmll.scoring import Scorer

    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    config = make_config(**{"compute.quantization": bits, "compute.dtype": "bfloat16"})
    model, tokenizer = load_model(tmp_path / "tiny", dtype="bfloat16", quantization=bits, device="cuda")
    method = create_method("abmll", model, Scorer(tokenizer, config.scoring), config)
    base = bayes_layers(model)["model.layers.0.self_attn.q_proj"].base_layer
    assert type(base).__name__ == ("Linear4bit" if bits == "4bit" else "Linear8bitLt")
    record = method.meta_step(_episodes())
    assert torch.isfinite(torch.tensor([record["outer_nll"], record["kl"], record["grad_norm"]])).all()
    assert {p.dtype for p in method.theta.values()} == {torch.float32}


# -------------------------------------------------------------------------------------------------- config
def test_compute_section_roundtrips_and_older_configs_load(tmp_path):
    config = ABMLLConfig().override(
        {"compute.dtype": "bfloat16", "compute.gradient_checkpointing": True, "compute.quantization": "4bit"}
    )
    data = config.to_dict()
    assert data["compute"] == {
        "dtype": "bfloat16", "gradient_checkpointing": True, "merge_without_grad": True, "quantization": "4bit"
    }
    assert ABMLLConfig.from_dict(json.loads(json.dumps(data))) == config
    config.save(tmp_path / "c.json")
    assert ABMLLConfig.load(tmp_path / "c.json") == config
    (tmp_path / "c.yaml").write_text("compute:\n  dtype: float16\n  gradient_checkpointing: true\n")
    assert ABMLLConfig.load(tmp_path / "c.yaml").compute.dtype == "float16"
    # a config (or checkpoint) saved before the section existed gets the defaults: float32, no checkpointing
    old = {k: v for k, v in data.items() if k != "compute"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = ABMLLConfig.load(tmp_path / "old.json")
    assert (loaded.compute.dtype, loaded.compute.gradient_checkpointing, loaded.compute.quantization) == (
        "float32", False, "none",
    )  # fmt: skip


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("compute.dtype", "fp8", "one of ('float32', 'bfloat16', 'float16')"),
        ("compute.dtype", "torch.bfloat16", "one of ('float32', 'bfloat16', 'float16')"),
        ("compute.gradient_checkpointing", "yes", "true or false"),
        ("compute.gradient_checkpointing", 1, "true or false"),
        ("compute.quantization", "2bit", "one of ('none', '4bit', '8bit')"),
        ("compute.quantization", None, "one of ('none', '4bit', '8bit')"),
    ],
)
def test_bad_compute_values_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        ABMLLConfig().override({field: value})
    assert str(info.value) == f"config field '{field}' = {value!r} is invalid: expected {allowed}"
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['precision'\] in section 'compute'"):
        ABMLLConfig.from_dict({"compute": {"precision": "bf16"}})
