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

Shared prefix (``scoring.shared_prefix``, on by default): each distinct prompt is encoded once and its options
are scored from its key/value cache, in evaluation and in the training forward + backward (gradients flow
through the cache to the adapter); a prompt prefix shared by the whole batch (≥ ``SHARED_MIN`` tokens, e.g.
ICL demonstrations) gets one pass of its own, and inside :meth:`Scorer.reuse_prefix` it is kept across calls.
The scores are the plain path's up to float rounding (tests/test_shared_prefix.py). Models whose decoder takes
no ``cache``, sliding-window attention and gradient checkpointing under autograd use the plain path. On this path,
with adapters on the top blocks only, the frozen-trunk cache (``scoring.trunk_cache_mb``, :mod:`abmll.trunk`)
replays the hidden states entering the lowest adapted block for a call whose prompts and options it has recorded.

One module of about 540 lines on purpose: the plain path and the shared-prefix path of each scorer share
tokenisation, padding and read positions, and are kept side by side so that they can be read against each other
(``tests/test_shared_prefix.py`` checks they agree).
"""

from __future__ import annotations

import inspect
import itertools
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from abmll.bayes.inject import one_noise
from abmll.config import ScoringConfig
from abmll.errors import ConfigError
from abmll.tasks.data import Example
from abmll.trunk import TrunkCache, lowest_adapted

LETTERS = string.ascii_uppercase
#: Prompt tokens that every row of a batch must share for the shared-prefix path to give them a pass of their own.
SHARED_MIN = 16


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The model's decoder and its LM head (None when they are not separable)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return decoder, (None if decoder is model else head)


def _logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on the hidden states read, in float32 (float64 for a float64 model), with the model's final
    logit soft-capping if any."""
    logits = head(hidden)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _can_share(model: nn.Module) -> bool:
    """Whether the shared-prefix path applies: a separable decoder that takes a key/value ``cache``, full
    attention in every layer, and no gradient checkpointing under autograd (it drops the cache)."""
    decoder, head = _split(model)
    config = getattr(decoder, "config", None)
    if head is None or config is None or "cache" not in inspect.signature(decoder.forward).parameters:
        return False
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    if types is None and getattr(config, "sliding_window", None) is not None:
        return False
    return not (
        torch.is_grad_enabled()
        and any(getattr(m, "gradient_checkpointing", False) and m.training for m in decoder.modules())
    )


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Pass:
    """The keys and values one decoder pass added, per layer ``[rows, heads, length, head_dim]``, and its mask."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    mask: torch.Tensor  # [rows, length]
    trunk: int | None = None  # L when the blocks below L were not run (no keys and values there)

    def crop(self, length: int) -> _Pass:
        keys = [None if k is None else k[..., :length, :] for k in self.keys]
        values = [None if v is None else v[..., :length, :] for v in self.values]
        return _Pass(keys, values, self.mask[:, :length], self.trunk)

    @property
    def length(self) -> int:
        return self.mask.shape[-1]


@dataclass
class _Kept:
    """A batch prefix kept by :meth:`Scorer.reuse_prefix`: its tokens and its pass."""

    ids: list[int] = field(default_factory=list)
    prefix: _Pass | None = None


@dataclass
class _TrunkPass:
    """A pass's frozen trunk (:mod:`abmll.trunk`): each row's hidden states entering block ``lowest``, given to
    replay (``below``) or filled in by the pass (``recorded``)."""

    lowest: int
    below: list[torch.Tensor] | None = None
    recorded: list[torch.Tensor] | None = None


class _PrefixedLayer(DynamicLayer):
    """One decoder layer's keys and values for a pass that continues earlier ones: theirs (each expanded to
    this pass's rows: its one row shared, or the rows of ``rows``), then this pass's own, which alone it keeps.
    A block that the frozen-trunk cache stands in for has no keys and values; only its length is read."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], past_length: int) -> None:
        super().__init__()
        self.past = past
        self.past_length = past_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        if not self.past:
            return key_states, value_states
        n = key_states.shape[0]

        def rows_of(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            return t.expand(n, -1, -1, -1) if rows is None else t.index_select(0, rows)

        keys = [rows_of(k, rows) for k, _, rows in self.past]
        values = [rows_of(v, rows) for _, v, rows in self.past]
        return torch.cat([*keys, key_states], dim=-2), torch.cat([*values, value_states], dim=-2)

    def get_seq_length(self) -> int:
        return self.past_length + (self.keys.shape[-2] if self.is_initialized else 0)


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


@dataclass
class Row:
    """One sequence to score: the (cut) prompt's tokens and the option's (empty for the label scorer)."""

    context: list[int]
    option_ids: list[int]
    example: int
    option: int
    norm: float  # divisor of the option's log-probability (length normalisation)


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
        self._kept: _Kept | None = None  # the prefix kept by reuse_prefix
        megabytes = self.config.trunk_cache_mb
        self.trunk = TrunkCache(megabytes * 2**20) if megabytes > 0 else None

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

    def rows(self, examples: Sequence[Example]) -> list[Row]:
        """The sequences to score, one per (example, option) (one per example for the label scorer), with the
        prompt cut from the left to fit ``max_length`` (counted in ``truncated``)."""
        if not examples:
            raise ValueError("cannot score an empty batch")
        out: list[Row] = []
        if self.config.scorer == "label":
            for e, ex in enumerate(examples):
                self.label_ids(len(ex.options))  # validates the labels
                full = self._context_ids(label_prompt(ex))
                ids = self._cut(full, 0)
                self.truncated += len(ids) < len(full)
                out.append(Row(ids, [], e, 0, 1.0))
            return out
        for e, ex in enumerate(examples):
            context = self._context_ids(ex.input) or [self.prefix_id]
            cut = False
            for o, option in enumerate(ex.options):
                cont = list(self.tokenizer(self.target_delimiter + option, add_special_tokens=False)["input_ids"])
                if not cont:
                    raise ConfigError(f"option {option!r} of example {ex.id!r} tokenises to nothing")
                ctx = self._cut(context, len(cont))
                cut = cut or len(ctx) < len(context)
                norm = {"none": 1.0, "token": float(len(cont)), "char": float(max(len(option), 1))}
                out.append(Row(ctx, cont, e, o, norm[self.config.length_norm]))
            self.truncated += cut
        return out

    def encode(self, examples: Sequence[Example]) -> Encoded:
        """The plain path's padded batch: every row's whole sequence (prompt and option)."""
        n_options = max(len(ex.options) for ex in examples) if examples else 0
        rows: list[tuple[list[int], list[int], int, int, float]] = []  # (ids, read positions, example, option, len)
        target_rows: list[list[int]] = []
        for row in self.rows(examples):
            ids = row.context + row.option_ids
            read = list(range(len(row.context) - 1, len(ids) - 1)) if row.option_ids else [len(ids) - 1]
            targets = [self.pad_id] * len(ids)
            if row.option_ids:
                for p in read:
                    targets[p] = ids[p + 1]
            rows.append((ids, read, row.example, row.option, row.norm))
            target_rows.append(targets)
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
        """Logits ``[n_read, vocab]`` at the read positions only, in float32 (the plain path)."""
        device = next(model.parameters()).device
        kwargs = dict(
            input_ids=enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device),
            position_ids=enc.position_ids.to(device),
        )
        decoder, head = _split(model)
        read = enc.read_mask.to(device)
        if head is None:  # no separable head: full logits, then read
            return model(**kwargs).logits[read].float()
        return _logits(model, head, decoder(**kwargs).last_hidden_state[read])

    def __call__(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        """Option log-probabilities ``[len(examples), n_options]`` (unnormalised over options for the
        option scorer; -inf where an example has fewer options)."""
        if self.config.shared_prefix and _can_share(model):
            with one_noise(model):  # σ ⊙ ε formed once for the call's two or three passes
                return self._shared(model, examples)
        enc = self.encode(examples)
        logits = self._read_logits(model, enc)
        device = logits.device
        out = torch.full((enc.n_examples, enc.n_options), float("-inf"), device=device, dtype=logits.dtype)
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
        per_row = torch.zeros(enc.input_ids.shape[0], device=device, dtype=logits.dtype)
        per_row = per_row.index_add(0, row_of_read, token_lp[:, 0])
        per_row = per_row / enc.lengths.to(device)
        return out.index_put((enc.row_example.to(device), enc.row_option.to(device)), per_row)

    # --- the shared-prefix path ----------------------------------------------------------------------
    @contextmanager
    def reuse_prefix(self) -> Iterator[None]:
        """Inside, the caller promises that the model's weights (and its adapters' posterior and weight sample)
        stay fixed: a prompt prefix shared by a whole batch (e.g. ICL demonstrations) is encoded once, under
        ``torch.no_grad``, and its keys and values are reused by every later call that starts with it."""
        previous, self._kept = self._kept, _Kept()
        try:
            yield
        finally:
            self._kept = previous

    def _pad(self, seqs: Sequence[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[N, L]`` padded on the scorer's side, and each row's last real index."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        last = torch.zeros(len(seqs), dtype=torch.long)
        for i, seq in enumerate(seqs):
            offset = width - len(seq) if self.padding_side == "left" else 0
            ids[i, offset : offset + len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, offset : offset + len(seq)] = 1
            last[i] = offset + len(seq) - 1
        return ids.to(device), mask.to(device), last.to(device)

    def _forward(
        self,
        decoder: nn.Module,
        seqs: Sequence[list[int]],
        past: list[tuple[_Pass, torch.Tensor | None]],
        trunk: _TrunkPass | None = None,
    ):
        """The decoder on ``seqs`` continuing the earlier passes ``past`` (each with the row of that pass that
        every new row continues, or None when that pass has one row, shared by all): the last hidden states,
        this pass's keys and values, and each row's last real index. Position ids continue each row's real
        tokens, so padding (here or in ``past``) changes nothing. ``trunk``: replay each row's hidden states
        entering the lowest adapted block instead of running the blocks below it, or record them
        (:mod:`abmll.trunk`)."""
        device = next(decoder.parameters()).device
        ids, mask, last = self._pad(seqs, device)
        if trunk is not None and trunk.below is not None:
            hidden = trunk.below[0].new_zeros((len(seqs), ids.shape[1], trunk.below[0].shape[-1]))
            for i, h in enumerate(trunk.below):
                offset = ids.shape[1] - h.shape[0] if self.padding_side == "left" else 0
                hidden[i, offset : offset + h.shape[0]] = h
            with TrunkCache.replay(decoder, trunk.lowest, hidden):
                hidden, this, last = self._forward(decoder, seqs, past)
            this.trunk = trunk.lowest
            return hidden, this, last
        if trunk is not None:
            with TrunkCache.capture(decoder, trunk.lowest) as captured:
                out = self._forward(decoder, seqs, past)
            real = mask.bool()
            trunk.recorded = [captured[0][i][real[i]] for i in range(len(seqs))]
            return out
        n = ids.shape[0]
        masks = [p.mask.expand(n, -1) if rows is None else p.mask[rows] for p, rows in past]
        before = sum((m.sum(-1) for m in masks), torch.zeros(n, dtype=torch.long, device=device))
        past_length = sum(p.length for p, _ in past)
        layers = [
            _PrefixedLayer([(p.keys[i], p.values[i], rows) for p, rows in past], past_length)
            for i in range(decoder.config.num_hidden_layers)
        ]
        cache = Cache(layers=layers)
        hidden = decoder(
            input_ids=ids,
            attention_mask=torch.cat([*masks, mask], dim=-1),
            position_ids=(before[:, None] + mask.cumsum(-1) - 1).clamp(min=0),
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        return hidden, _Pass([la.keys for la in layers], [la.values for la in layers], mask), last

    def _prefix_plan(self, contexts: list[list[int]], needs_trunk: bool) -> tuple[_Pass | None, int]:
        """The prompt tokens shared by every row of the batch (all but each prompt's last), when there are at
        least ``SHARED_MIN`` of them or when a kept one (:meth:`reuse_prefix`) covers that many: (a crop of the
        kept pass, its length) or (None, the length of a prefix pass to run now; 0: none). ``needs_trunk``: a
        kept pass that ran without the blocks below the adapted ones (a trunk replay) cannot be continued by a
        pass that runs them."""
        first = contexts[0]
        shared = min(len(c) for c in contexts) - 1
        for c in contexts[1:]:
            shared = min(shared, _common(first, c))
        kept = self._kept if self._kept is not None and not torch.is_grad_enabled() else None
        if kept is not None and kept.prefix is not None and not (needs_trunk and kept.prefix.trunk is not None):
            common = _common(kept.ids, first[:shared])
            if common >= SHARED_MIN:
                return kept.prefix.crop(common), common
        return None, shared if shared >= SHARED_MIN else 0

    @staticmethod
    def _paths(contexts, rows, longer, index, start: int, prefix_pass: bool) -> list[list[tuple]]:
        """The trunk-cache paths (:mod:`abmll.trunk`) of a call's three passes: the batch prefix's (when it runs
        now), each prompt's (its rest after the prefix) and each longer option's continuation."""
        prefix = (tuple(contexts[0][:start]),) if start else ()
        prompts = [(*prefix, tuple(c[start:])) for c in contexts]
        options = [(*prompts[index[tuple(rows[i].context)]], tuple(rows[i].option_ids[:-1])) for i in longer]
        return [[prefix] if prefix and prefix_pass else [], prompts, options]

    def _shared(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        """The scores of :meth:`__call__` with each distinct prompt encoded once: a pass over the prompt prefix
        shared by the batch (:meth:`_prefix_plan`), one over each distinct prompt (the rest of it), whose last
        position predicts every option's first token, and one over each option's other tokens, continuing its
        prompt's keys and values. Gradients flow through all three to the adapter."""
        decoder, head = _split(model)
        rows = self.rows(examples)
        index: dict[tuple[int, ...], int] = {}
        contexts: list[list[int]] = []
        for row in rows:
            if index.setdefault(tuple(row.context), len(contexts)) == len(contexts):
                contexts.append(row.context)
        longer = [i for i, row in enumerate(rows) if len(row.option_ids) > 1]
        lowest = lowest_adapted(decoder) if self.trunk is not None else None
        kept, start = self._prefix_plan(contexts, needs_trunk=lowest is None)
        paths = self._paths(contexts, rows, longer, index, start, kept is None)
        # replay the frozen trunk when every path of the call is kept (abmll.trunk)
        below = self.trunk.lookup(decoder, lowest, [p for g in paths for p in g]) if lowest is not None else None
        if below is None and kept is not None and kept.trunk is not None:
            # a pass that runs every block cannot continue a kept prefix that skipped them
            kept, start = self._prefix_plan(contexts, needs_trunk=True)
            paths = self._paths(contexts, rows, longer, index, start, kept is None)
        trunks: list[_TrunkPass | None] = [None, None, None]  # the prefix, prompts and options passes
        if lowest is not None:
            ends = [0, *itertools.accumulate(len(group) for group in paths)]
            trunks = [_TrunkPass(lowest, below[ends[g] : ends[g + 1]] if below else None) for g in range(3)]

        def run(seqs, past, g: int):
            out = self._forward(decoder, seqs, past, trunks[g])
            if trunks[g] is not None and trunks[g].recorded is not None:
                self.trunk.store(paths[g], trunks[g].recorded)
            return out

        past = [] if kept is None else [(kept, None)]
        if kept is None and start:  # the batch prefix's own pass
            _, prefix, _ = run([contexts[0][:start]], [], 0)
            past = [(prefix, None)]
            if self._kept is not None and not torch.is_grad_enabled():
                self._kept.ids, self._kept.prefix = contexts[0][:start], prefix
        hidden, prompts, last = run([c[start:] for c in contexts], past, 1)
        logits = _logits(model, head, hidden[torch.arange(len(contexts), device=hidden.device), last])
        device = logits.device
        width = max(len(ex.options) for ex in examples)
        out = torch.full((len(examples), width), float("-inf"), device=device, dtype=logits.dtype)
        of_row = torch.tensor([index[tuple(row.context)] for row in rows], device=device)
        if self.config.scorer == "label":
            for e, ex in enumerate(examples):
                ids = self.label_ids(len(ex.options))
                out[e, : len(ids)] = torch.log_softmax(logits[of_row[e], ids], dim=-1)
            return out
        first = torch.tensor([row.option_ids[0] for row in rows], device=device)
        per_row = torch.log_softmax(logits, dim=-1)[of_row, first]
        if longer:
            at = torch.tensor(longer, device=device)
            hidden, _, _ = run([rows[i].option_ids[:-1] for i in longer], [*past, (prompts, of_row[at])], 2)
            targets, mask, _ = self._pad([rows[i].option_ids[1:] for i in longer], device)
            read = mask.bool()
            token_lp = torch.log_softmax(_logits(model, head, hidden[read]), dim=-1).gather(-1, targets[read][:, None])
            row_of_read = at[:, None].expand_as(read)[read]
            per_row = per_row.index_add(0, row_of_read, token_lp[:, 0])
        per_row = per_row / torch.tensor([row.norm for row in rows], device=device)
        example = torch.tensor([row.example for row in rows], device=device)
        option = torch.tensor([row.option for row in rows], device=device)
        return out.index_put((example, option), per_row)

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
