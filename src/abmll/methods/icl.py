"""``icl``: the base model with the k support examples as demonstrations in the prompt (METHOD.md section 6).

Each query example is scored with its input replaced by the demonstrations, oldest first, then the query's
own input, separated by blank lines::

    {input_1} {answer_1}\\n\\n{input_2} {answer_2}\\n\\n … \\n\\n{query input}

(the space is the scorer's ``target_delimiter``, the one that separates a prompt from its option). With the
``label`` scorer a demonstration is written in the format it scores — the lettered prompt followed by the
gold letter (``{input}\\nA. …\\nB. …\\nAnswer: B``) — and the query's lettered prompt follows.

Truncation: the prompt must fit in ``scoring.max_length`` tokens together with the longest option (counted
with the scorer's own tokenizer, exactly as it will encode them); while it does not, the OLDEST
demonstration (the first one) is dropped. If even the query alone does not fit, it is left to the scorer,
which cuts it from the left as for any other method. Options, gold and id are unchanged. A warning names the
task and says how many query examples lost demonstrations.

The demonstrations are one prompt prefix shared by every query example and option of a task: the scorer
encodes them once per task (and weight sample) and reuses their key/value cache
(:meth:`abmll.scoring.Scorer.reuse_prefix`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from abmll.methods.zero_shot import ZeroShot
from abmll.scoring import LETTERS, label_prompt
from abmll.tasks.data import Example

SEPARATOR = "\n\n"
logger = logging.getLogger(__name__)


def demonstration(example: Example, scorer) -> str:
    """One solved example, in the format the scorer reads."""
    if scorer.config.scorer == "label":
        return f"{label_prompt(example)} {LETTERS[example.gold]}"
    return f"{example.input}{scorer.target_delimiter}{example.answer}"


def scored_length(example: Example, scorer) -> int:
    """Tokens of the longest sequence the scorer builds for ``example`` (prompt + longest option)."""
    if scorer.config.scorer == "label":
        return len(scorer._context_ids(label_prompt(example)))
    context = scorer._context_ids(example.input) or [scorer.prefix_id]
    longest = max(
        len(scorer.tokenizer(scorer.target_delimiter + option, add_special_tokens=False)["input_ids"])
        for option in example.options
    )
    return len(context) + longest


def fit_demonstrations(support: Sequence[Example], example: Example, scorer) -> tuple[Example, int]:
    """``example`` with the support examples as demonstrations before its input, the oldest dropped first
    until the prompt fits in ``scoring.max_length``; and how many demonstrations it kept."""
    demos = [demonstration(s, scorer) for s in support]
    for start in range(len(demos) + 1):
        candidate = Example(SEPARATOR.join([*demos[start:], example.input]), example.options, example.gold, example.id)
        if scored_length(candidate, scorer) <= scorer.config.max_length:
            return candidate, len(demos) - start
    return candidate, 0  # not even the query alone fits: the scorer cuts it from the left


def with_demonstrations(support: Sequence[Example], example: Example, scorer) -> Example:
    """``example`` with as many support examples as fit before it, newest kept (:func:`fit_demonstrations`)."""
    return fit_demonstrations(support, example, scorer)[0]


def demonstrate(
    support: Sequence[Example], query: Sequence[Example], scorer, task: str | None = None
) -> list[Example]:
    """Every query example with the support set as demonstrations (:func:`fit_demonstrations`); a warning
    naming ``task`` when some of them did not fit."""
    fitted = [fit_demonstrations(support, ex, scorer) for ex in query]
    short = [kept for _, kept in fitted if kept < len(support)]
    if short:
        logger.warning(
            "task '%s': %d of %d query examples keep fewer than the %d demonstrations (as few as %d) in "
            "scoring.max_length = %d tokens; the oldest were dropped",
            task or "?", len(short), len(query), len(support), min(short), scorer.config.max_length,
        )
    return [ex for ex, _ in fitted]


class ICL(ZeroShot):
    """In-context learning: the base model, no adapter, the support set in the prompt."""

    name = "icl"
    demonstrates = True

    def adapt(self, support: Sequence[Example], seed: int) -> list[Example]:
        return list(support)

    @torch.no_grad()
    def predict(self, adapted: list[Example], query: Sequence[Example], seed: int) -> torch.Tensor:
        with self.scorer.reuse_prefix():  # the demonstrations are encoded once for the whole query set
            return super().predict(None, demonstrate(adapted, query, self.scorer, self.task), seed)
