"""The scorers (METHOD.md section 4) on a tiny random Llama: padding-side and batch independence, agreement
with a hand computation from the full logits, length normalisation, single-token labels, left truncation,
the training NLL, gradients through an adapter; and zero-shot accuracy of the real SmolLM2-135M (slow)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import adapted_tiny, make_config

from abmll.bayes import prior, weight_sample
from abmll.config import ScoringConfig
from abmll.errors import ConfigError
from abmll.metrics import task_metrics
from abmll.scoring import Scorer, label_prompt, option_probabilities
from abmll.tasks.data import Example
from abmll.tasks.readers import read_metaicl_file
from abmll.tiny import tiny_llama

REAL_FIXTURE = Path(__file__).parent / "fixtures" / "real" / "easy_qa.jsonl"
TOL = 1e-5

LONG = (
    "the old man walked down the long road to the river and saw a small boat near the water while "
    "the children played in the field and the dog ran after a bird under the warm morning sun"
)
# very different prompt lengths (2 to 36 words) and option counts (2, 3, 4), options of 1 to 5 tokens
MIXED = [
    Example("the cat", ("yes", "no"), 0, id="short"),
    Example(LONG, ("the boat", "a bird in the sky", "nothing"), 1, id="long"),
    Example("what is the color of the sea ?", ("blue", "green water", "red", "the color of fire"), 3, id="mid"),
]


def sharp_tiny(seed: int = 0):
    """The tiny random Llama with its weights perturbed so that logits (and position effects) are far from
    uniform: a leaked pad token or a misread position then moves the scores by much more than TOL."""
    model, tok = tiny_llama(seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model, tok


@pytest.fixture(scope="module")
def tiny():
    return sharp_tiny()


def score(model, tok, examples, padding_side="right", **config) -> torch.Tensor:
    with torch.no_grad():
        return Scorer(tok, ScoringConfig(**config), padding_side=padding_side)(model, examples)


def ids_of(tok, text: str, special: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def full_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the full model logits of one unpadded sequence, ``[len(ids), vocab]``."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def hand_option_score(model, tok, context: list[int], option: str) -> tuple[float, int]:
    """Σ log p(option token | everything before) from the full logits, and the option's token count."""
    cont = ids_of(tok, " " + option, special=False)
    ids = context + cont
    lp = full_log_probs(model, ids)
    total = sum(lp[p, ids[p + 1]].item() for p in range(len(context) - 1, len(ids) - 1))
    return total, len(cont)


def assert_missing_options_are_minus_inf(scores: torch.Tensor, examples) -> None:
    for row, ex in zip(scores, examples, strict=True):
        n = len(ex.options)
        assert torch.isfinite(row[:n]).all(), row
        assert torch.isneginf(row[n:]).all(), row


# --- padding side and batch independence ------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("scorer", ["option", "label"])
def test_left_and_right_padding_give_the_same_scores(tiny, scorer, shared):
    model, tok = tiny
    left_scorer = Scorer(tok, ScoringConfig(scorer=scorer), padding_side="left")
    enc = left_scorer.encode(MIXED)
    assert (enc.attention_mask[:, 0] == 0).any() and (enc.attention_mask[:, -1] == 1).all()  # really left-padded
    left = score(model, tok, MIXED, "left", scorer=scorer, shared_prefix=shared)
    right = score(model, tok, MIXED, "right", scorer=scorer, shared_prefix=shared)
    assert left.shape == right.shape == (3, 4)
    assert_missing_options_are_minus_inf(left, MIXED)
    assert_missing_options_are_minus_inf(right, MIXED)
    finite = torch.isfinite(left)
    assert (left[finite] - right[finite]).abs().max().item() < TOL
    assert torch.equal(torch.isneginf(left), torch.isneginf(right))
    probs = option_probabilities(left)
    assert (probs[~finite] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    if scorer == "label":  # already normalised over the labels
        torch.testing.assert_close(left.exp().sum(-1), torch.ones(3))


@pytest.mark.parametrize("shared", [False, True])
def test_padding_check_is_sensitive_to_leaked_pads(tiny, monkeypatch, shared):
    """The padding test above has power: attending to the pad tokens (an all-ones attention mask on a
    left-padded batch) moves the scores by far more than TOL, on the plain and on the shared-prefix path. (A
    constant shift of the position ids would not: RoPE attention depends only on relative positions.)"""
    model, tok = tiny
    right = score(model, tok, MIXED, "right", shared_prefix=shared)
    if shared:
        pad = Scorer._pad
        all_ones = lambda ids, mask, last: (ids, torch.ones_like(mask), last)  # noqa: E731
        monkeypatch.setattr(Scorer, "_pad", lambda self, *a: all_ones(*pad(self, *a)))
    else:
        encode = Scorer.encode
        monkeypatch.setattr(
            Scorer,
            "encode",
            lambda self, ex: dataclasses.replace(
                enc := encode(self, ex), attention_mask=torch.ones_like(enc.attention_mask)
            ),
        )
    wrong = score(model, tok, MIXED, "left", shared_prefix=shared)
    finite = torch.isfinite(right)
    assert (wrong[finite] - right[finite]).abs().max().item() > 1e-3


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("scorer", ["option", "label"])
def test_each_row_equals_the_example_scored_alone(tiny, scorer, padding_side):
    model, tok = tiny
    batch = score(model, tok, MIXED, padding_side, scorer=scorer)
    for i, ex in enumerate(MIXED):
        alone = score(model, tok, [ex], padding_side, scorer=scorer)
        assert alone.shape == (1, len(ex.options))
        assert (batch[i, : len(ex.options)] - alone[0]).abs().max().item() < TOL


def test_lm_head_runs_only_at_the_read_positions(tiny):
    """Plain path: one head row per option token (label scorer: per example). Shared-prefix path: one per
    prompt (its last position predicts every option's first token), then one per further option token."""
    model, tok = tiny
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        for shared in (False, True):
            for scorer in ("option", "label"):
                s = Scorer(tok, ScoringConfig(scorer=scorer, shared_prefix=shared), padding_side="left")
                n_read = int(s.encode(MIXED).read_mask.sum())
                with torch.no_grad():
                    s(model, MIXED)
                if not shared:
                    assert seen[-1] == n_read
    finally:
        handle.remove()
    option_lengths = [len(ids_of(tok, " " + o, special=False)) for ex in MIXED for o in ex.options]
    assert seen[:2] == [sum(option_lengths), len(MIXED)]
    assert seen[2:] == [len(MIXED), sum(n - 1 for n in option_lengths), len(MIXED)]


# --- agreement with a hand computation -----------------------------------------------------------------
@pytest.mark.parametrize("length_norm", ["none", "token", "char"])
def test_option_scorer_equals_hand_computation(tiny, length_norm):
    model, tok = tiny
    ex = MIXED[2]
    got = score(model, tok, [ex], "left", length_norm=length_norm)[0]
    context = ids_of(tok, ex.input)
    for o, option in enumerate(ex.options):
        total, n_tokens = hand_option_score(model, tok, context, option)
        divisor = {"none": 1.0, "token": n_tokens, "char": len(option)}[length_norm]
        assert abs(got[o].item() - total / divisor) < TOL, (option, got[o].item(), total / divisor)
    assert len(ids_of(tok, " the color of fire", special=False)) == 4  # the token and char counts differ


def test_label_scorer_equals_hand_computation(tiny):
    model, tok = tiny
    got = score(model, tok, MIXED, "left", scorer="label")
    for i, ex in enumerate(MIXED):
        prompt = label_prompt(ex)
        assert prompt.endswith("\nAnswer:") and "\nB. " in prompt
        labels = [ids_of(tok, " " + letter, special=False) for letter in "ABCD"[: len(ex.options)]]
        assert all(len(label) == 1 for label in labels)
        last = full_log_probs(model, ids_of(tok, prompt))[-1]  # log_softmax is shift-invariant per row
        expected = torch.log_softmax(last[[label[0] for label in labels]], dim=-1)
        assert (got[i, : len(ex.options)] - expected).abs().max().item() < TOL


class SplitLabelTokenizer:
    """Wraps a tokenizer so that one label letter (with or without a leading space) encodes to two ids."""

    def __init__(self, tokenizer, letter: str) -> None:
        self._tok, self._letter = tokenizer, letter

    def __call__(self, text, **kwargs):
        if text.strip() == self._letter:
            return {"input_ids": [10, 11], "attention_mask": [1, 1]}
        return self._tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_label_scorer_rejects_a_label_that_is_not_one_token(tiny):
    model, tok = tiny
    scorer = Scorer(SplitLabelTokenizer(tok, "C"), ScoringConfig(scorer="label"))
    assert scorer(model, MIXED[:1]).shape == (1, 2)  # labels A and B are still single tokens
    with pytest.raises(ConfigError, match=r"single-token labels, but 'C' is not one token.*scorer = 'option'"):
        scorer(model, MIXED)


# --- truncation and empty prompts ---------------------------------------------------------------------
def test_long_prompts_are_cut_from_the_left_and_counted(tiny):
    model, tok = tiny
    max_length = 12
    words = LONG.split()
    assert len(ids_of(tok, LONG)) == len(words) == 38  # one token per word
    scorer = Scorer(tok, ScoringConfig(max_length=max_length), padding_side="left")
    with torch.no_grad():
        got = scorer(model, MIXED)
    assert scorer.truncated == 1  # only the long prompt, counted once for its 3 options
    enc = Scorer(tok, ScoringConfig(max_length=max_length)).encode(MIXED)
    assert enc.attention_mask.sum(-1).max().item() == max_length
    ex = MIXED[1]
    for o, option in enumerate(ex.options):
        n_option = len(ids_of(tok, " " + option, special=False))
        kept = " ".join(words[len(words) - (max_length - n_option) :])  # the manually left-cut prompt
        expected = score(model, tok, [Example(kept, ex.options, 0)])[0, o]
        assert abs(got[1, o].item() - expected.item()) < TOL
    # the other examples fit and are untouched
    assert (got[[0, 2]] - score(model, tok, [MIXED[0], MIXED[2]]))[torch.isfinite(got[[0, 2]])].abs().max() < TOL
    with torch.no_grad():
        scorer(model, MIXED)
    assert scorer.truncated == 2  # the counter accumulates over calls


def test_label_prompt_is_cut_from_the_left(tiny):
    model, tok = tiny
    max_length = 16
    scorer = Scorer(tok, ScoringConfig(scorer="label", max_length=max_length))
    with torch.no_grad():
        got = scorer(model, MIXED[1:2])[0]
    assert scorer.truncated == 1
    ids = ids_of(tok, label_prompt(MIXED[1]))[-max_length:]  # keeps the options and the answer cue
    last = full_log_probs(model, ids)[-1]
    labels = [ids_of(tok, " " + letter, special=False)[0] for letter in "ABC"]
    assert (got[:3] - torch.log_softmax(last[labels], dim=-1)).abs().max().item() < TOL


def test_max_length_too_small_for_an_option_is_a_config_error(tiny):
    model, tok = tiny
    ex = Example("the cat", ("yes", " ".join(["the"] * 8)), 0)
    with pytest.raises(ConfigError, match="max_length = 8 leaves no room"):
        Scorer(tok, ScoringConfig(max_length=8)).encode([ex])


def test_an_empty_prompt_is_scored_after_the_bos_token(tiny):
    model, tok = tiny
    ex = Example("", ("yes", "the cat"), 0)
    got = score(model, tok, [ex, MIXED[1]], "right")[0]
    for o, option in enumerate(ex.options):
        expected, _ = hand_option_score(model, tok, [tok.bos_token_id], option)
        assert abs(got[o].item() - expected) < TOL
    assert (got[:2] - score(model, tok, [ex], "left")[0]).abs().max().item() < TOL


# --- the training likelihood ---------------------------------------------------------------------------
@pytest.mark.parametrize("length_norm", ["none", "token"])
def test_nll_options_and_lm(tiny, length_norm):
    model, tok = tiny
    gold = torch.tensor([ex.gold for ex in MIXED])
    scores = score(model, tok, MIXED, length_norm=length_norm)
    with torch.no_grad():
        nll_options = Scorer(tok, ScoringConfig(length_norm=length_norm)).nll(model, MIXED)
        nll_lm = Scorer(tok, ScoringConfig(length_norm=length_norm, likelihood="lm")).nll(model, MIXED)
    by_hand = -torch.log_softmax(scores, dim=-1)[torch.arange(3), gold].mean()
    assert abs(nll_options.item() - by_hand.item()) < TOL
    assert abs(nll_options.item() - F.cross_entropy(scores, gold).item()) < TOL
    assert abs(nll_lm.item() - (-scores[torch.arange(3), gold].mean()).item()) < TOL
    assert nll_lm.item() > nll_options.item() > 0


# --- gradients -------------------------------------------------------------------------------------------
def test_gradients_flow_to_the_adapter_and_are_finite_with_left_padding():
    config = make_config(**{"lora.targets": "all-linear"})
    model, base_scorer = adapted_tiny(config)
    theta = prior(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move θ off its initialisation (B = 0) so that every factor gets a gradient
        for p in theta.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    grads = {}
    for side in ("left", "right"):
        scorer = Scorer(base_scorer.tokenizer, config.scoring, padding_side=side)
        with weight_sample(model, 7):
            loss = scorer.nll(model, MIXED)
        assert torch.isfinite(loss)
        grads[side] = torch.autograd.grad(loss, list(theta.values()))
    for name, g_left, g_right in zip(theta, grads["left"], grads["right"], strict=True):
        assert torch.isfinite(g_left).all(), name
        assert g_left.abs().sum() > 0, name
        torch.testing.assert_close(g_left, g_right, rtol=1e-4, atol=1e-6, msg=name)


# --- the real model (slow) -------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_zero_shot_is_well_above_chance(smollm2):
    model, tok = smollm2
    task = read_metaicl_file(REAL_FIXTURE)
    assert len(task) == 40 and {len(ex.options) for ex in task.examples} == {2, 3, 4}
    gold = torch.tensor([ex.gold for ex in task.examples])
    chance = sum(1 / len(ex.options) for ex in task.examples) / len(task)
    left, right = [], []
    for start in range(0, len(task), 8):
        batch = task.examples[start : start + 8]
        left.append(score(model, tok, batch, "left"))
        right.append(score(model, tok, batch, "right"))
    width = max(s.shape[1] for s in left)
    pad = lambda s: F.pad(s, (0, width - s.shape[1]), value=float("-inf"))  # noqa: E731
    scores, scores_right = torch.cat([pad(s) for s in left]), torch.cat([pad(s) for s in right])
    finite = torch.isfinite(scores)
    assert (scores[finite] - scores_right[finite]).abs().max().item() < 1e-4  # padding side, real RoPE + SDPA
    metrics = task_metrics(option_probabilities(scores), gold)
    print(
        f"\nSmolLM2-135M zero-shot, option scorer (sum), {len(task)} easy questions: accuracy "
        f"{metrics['accuracy']:.3f} (chance {chance:.3f}), ECE {metrics['ece']:.3f}, NLL {metrics['nll']:.3f}"
    )
    # measured 0.775 (31/40) against chance 0.354; 0.25 above chance is ~3.4 binomial s.d. under guessing
    assert metrics["accuracy"] > chance + 0.25
