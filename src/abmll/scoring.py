"""Scorers: a batch of examples → option log-probabilities ``[batch, n_options]`` (METHOD.md section 4).

- ``option``: log p(option | prompt) = Σ of the option's token log-probs after the prompt, optionally
  divided by its token or character count (lm-evaluation-harness ``acc_norm``). The LM head runs only at
  the continuation positions.
- ``label``: the prompt lists the options as ``A. … B. …`` and ends with an answer cue; the next-token
  logits at the last real position, restricted to the label tokens. The LM head runs only for those rows.

Padding is applied by the scorer itself on either side; position ids come from the attention mask, so the
padding side does not change any result. Prompts longer than ``max_length`` are cut from the left and
counted in ``Scorer.truncated`` (once per example, however many of its option rows were cut). A prompt that
tokenises to nothing is replaced by the BOS token (else EOS), as lm-evaluation-harness does, so the first
option token is still predicted from a real position. Examples with fewer options than the batch's widest
get ``-inf`` in the missing columns (probability 0).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from abmll.config import ScoringConfig
from abmll.errors import ConfigError
from abmll.tasks.data import Example

LETTERS = string.ascii_uppercase


@dataclass
class Encoded:
    """A padded batch of token sequences and where to read it."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    read_mask: torch.Tensor  # [N, L] bool: positions whose hidden state is read
    targets: torch.Tensor  # [N, L] long: the token predicted at each read position (option scorer)
    row_example: torch.Tensor  # [N]: the example of each row
    row_option: torch.Tensor  # [N]: the option of each row (option scorer)
    lengths: torch.Tensor  # [N] float: token (or character) count used for normalisation
    n_examples: int
    n_options: int

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)


def label_prompt(example: Example, answer_cue: str = "Answer:") -> str:
    """The lettered prompt of the ``label`` scorer: the input, ``A. …`` lines, the answer cue."""
    lines = [example.input] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(example.options)]
    return "\n".join(lines + [answer_cue])


class Scorer:
    """Turns examples into option log-probabilities with a causal LM: ``scorer(model, examples)``."""

    def __init__(
        self,
        tokenizer,
        config: ScoringConfig | None = None,
        padding_side: str = "right",
        target_delimiter: str = " ",
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config or ScoringConfig()
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side = {padding_side!r} is invalid: expected 'left' or 'right'")
        self.padding_side = padding_side
        self.target_delimiter = target_delimiter
        self.truncated = 0
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix_id = self.pad_id if prefix is None else int(prefix)  # context of an empty prompt
        self._label_ids: dict[int, list[int]] = {}

    # --- encoding ------------------------------------------------------------------------------------
    def _context_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _cut(self, context: list[int], keep: int) -> list[int]:
        """Cut a prompt from the left so that ``keep`` more tokens fit in ``max_length`` (not counted here)."""
        room = self.config.max_length - keep
        if room < 1:
            raise ConfigError(
                f"scoring.max_length = {self.config.max_length} leaves no room for the prompt "
                f"(an option needs {keep} tokens)"
            )
        if len(context) > room:
            return context[len(context) - room :]
        return context

    def label_ids(self, n_options: int) -> list[int]:
        """Token ids of the labels ``A``, ``B``, …: each one token, with or without a leading space."""
        if n_options not in self._label_ids:
            ids = []
            for letter in LETTERS[:n_options]:
                for variant in (" " + letter, letter):
                    tok = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
                    if len(tok) == 1:
                        ids.append(int(tok[0]))
                        break
                else:
                    raise ConfigError(
                        f"the label scorer needs single-token labels, but '{letter}' is not one token "
                        f"(with or without a leading space) for this tokenizer; use scoring.scorer = 'option'"
                    )
            self._label_ids[n_options] = ids
        return self._label_ids[n_options]

    def encode(self, examples: Sequence[Example]) -> Encoded:
        if not examples:
            raise ValueError("cannot score an empty batch")
        n_options = max(len(ex.options) for ex in examples)
        rows: list[
            tuple[list[int], list[int], int, int, float]
        ] = []  # (ids, read positions, example, option, len)
        target_rows: list[list[int]] = []
        if self.config.scorer == "label":
            for e, ex in enumerate(examples):
                self.label_ids(len(ex.options))  # validates the labels
                full = self._context_ids(label_prompt(ex))
                ids = self._cut(full, 0)
                self.truncated += len(ids) < len(full)
                rows.append((ids, [len(ids) - 1], e, 0, 1.0))
                target_rows.append([self.pad_id] * len(ids))
        else:
            for e, ex in enumerate(examples):
                context = self._context_ids(ex.input) or [self.prefix_id]
                cut = False
                for o, option in enumerate(ex.options):
                    cont = list(
                        self.tokenizer(self.target_delimiter + option, add_special_tokens=False)["input_ids"]
                    )
                    if not cont:
                        raise ConfigError(f"option {option!r} of example {ex.id!r} tokenises to nothing")
                    ctx = self._cut(context, len(cont))
                    cut = cut or len(ctx) < len(context)
                    ids = ctx + cont
                    read = list(range(len(ctx) - 1, len(ids) - 1))
                    targets = [self.pad_id] * len(ids)
                    for p in read:
                        targets[p] = ids[p + 1]
                    norm = {"none": 1.0, "token": float(len(cont)), "char": float(max(len(option), 1))}
                    rows.append((ids, read, e, o, norm[self.config.length_norm]))
                    target_rows.append(targets)
                self.truncated += cut
        width = max(len(r[0]) for r in rows)
        N = len(rows)
        input_ids = torch.full((N, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((N, width), dtype=torch.long)
        read_mask = torch.zeros((N, width), dtype=torch.bool)
        targets = torch.full((N, width), self.pad_id, dtype=torch.long)
        for i, ((ids, read, _, _, _), tgt) in enumerate(zip(rows, target_rows, strict=True)):
            offset = width - len(ids) if self.padding_side == "left" else 0
            input_ids[i, offset : offset + len(ids)] = torch.tensor(ids)
            attention[i, offset : offset + len(ids)] = 1
            targets[i, offset : offset + len(ids)] = torch.tensor(tgt)
            read_mask[i, [offset + p for p in read]] = True
        return Encoded(
            input_ids=input_ids,
            attention_mask=attention,
            read_mask=read_mask,
            targets=targets,
            row_example=torch.tensor([r[2] for r in rows]),
            row_option=torch.tensor([r[3] for r in rows]),
            lengths=torch.tensor([r[4] for r in rows], dtype=torch.float32),
            n_examples=len(examples),
            n_options=n_options,
        )

    # --- scoring -------------------------------------------------------------------------------------
    def _read_logits(self, model: nn.Module, enc: Encoded) -> torch.Tensor:
        """Logits ``[n_read, vocab]`` at the read positions only, in float32."""
        device = next(model.parameters()).device
        kwargs = dict(
            input_ids=enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device),
            position_ids=enc.position_ids.to(device),
        )
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        read = enc.read_mask.to(device)
        if decoder is model or head is None:  # no separable head: full logits, then read
            return model(**kwargs).logits[read].float()
        hidden = decoder(**kwargs).last_hidden_state[read]
        logits = head(hidden).float()
        cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def __call__(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        """Option log-probabilities ``[len(examples), n_options]`` (unnormalised over options for the
        option scorer; -inf where an example has fewer options)."""
        enc = self.encode(examples)
        logits = self._read_logits(model, enc)
        device = logits.device
        out = torch.full((enc.n_examples, enc.n_options), float("-inf"), device=device)
        if self.config.scorer == "label":
            for e, ex in enumerate(examples):
                ids = self.label_ids(len(ex.options))
                out[e, : len(ids)] = torch.log_softmax(logits[e, ids], dim=-1)
            return out
        token_lp = torch.log_softmax(logits, dim=-1).gather(
            -1, enc.targets.to(device)[enc.read_mask.to(device)][:, None]
        )
        row_of_read = torch.arange(enc.input_ids.shape[0], device=device)[:, None].expand_as(enc.read_mask)
        row_of_read = row_of_read[enc.read_mask.to(device)]
        per_row = torch.zeros(enc.input_ids.shape[0], device=device).index_add(0, row_of_read, token_lp[:, 0])
        per_row = per_row / enc.lengths.to(device)
        return out.index_put((enc.row_example.to(device), enc.row_option.to(device)), per_row)

    def nll(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        """The training likelihood: mean cross-entropy over the options (``likelihood='options'``) or the
        mean token NLL of the gold continuation (``likelihood='lm'``, option scorer)."""
        scores = self(model, examples)
        gold = torch.tensor([ex.gold for ex in examples], device=scores.device)
        if self.config.likelihood == "lm" and self.config.scorer == "option":
            return -scores.gather(1, gold[:, None]).mean()
        return F.cross_entropy(scores, gold)


def option_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """p(option | x): a softmax over the option scores (-inf columns get probability 0)."""
    return torch.softmax(scores, dim=-1)
