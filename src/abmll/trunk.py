"""The frozen-trunk cache (``scoring.trunk_cache_mb``): when adapters sit on the top blocks only (``lora.layers``),
the decoder blocks below the lowest adapted one never change, so the hidden states entering that block are a
function of the tokens alone. They are computed once per prompt and once per option continuation, kept in RAM
(least recently used first out, within a byte budget), and every later forward pass over the same tokens, inner
or outer step, support or query, weight sample or test-time step, of any method, starts at that block.

Each entry is computed the same way whatever the batch it first came in (one prompt, or one batch prefix and then
each prompt's rest, at a time, unpadded; each option continuing its prompt's keys and values, one at a time), so
a score does not depend on what the cache held before: a warm cache and a cold one give the same numbers bit for
bit, and a resumed run the numbers of an uninterrupted one. (One exception: inside ``Scorer.reuse_prefix``, ICL
prompts continue the kept demonstrations' keys and values, cropped to the batch's common prefix, as the
shared-prefix path does; there a warm and a cold cache may differ by float rounding.) Against the shared-prefix
path without the cache the scores agree up to float rounding (tests/test_trunk_cache.py).

The cache belongs to one scorer and one trunk: it is emptied when the lowest adapted block changes or when any
weight or buffer of the trunk (embeddings and the blocks below) is replaced or modified in place (a fingerprint
of their identities and version counters, read at every call). Keys are token ids, so a change of tokenizer,
prompt format or truncation makes new entries rather than stale hits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from abmll.bayes.layer import LoRALinear

Tokens = tuple[int, ...]


def lowest_adapted(decoder: nn.Module) -> int | None:
    """The index L of the lowest decoder block that holds an adapter or a trainable parameter, when the blocks
    below it form a frozen trunk worth caching (L ≥ 1, a ``layers`` list, nothing below L trains, no dropout
    below L in training mode, no sharded parameter); None otherwise (every block adapted, or none)."""
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        return None
    lowest = next(
        (
            i
            for i, block in enumerate(layers)
            if any(isinstance(m, LoRALinear) for m in block.modules())
            or any(p.requires_grad for p in block.parameters())
        ),
        None,
    )
    if lowest is None or lowest == 0:
        return None
    for _, p in _trunk_tensors(decoder, lowest):
        if p.requires_grad or type(p).__name__ == "DTensor" or p.device.type == "meta":
            return None
    if decoder.training:
        config = getattr(decoder, "config", None)
        if getattr(config, "attention_dropout", 0.0) or any(
            isinstance(m, nn.Dropout) and m.p > 0 for block in layers[:lowest] for m in block.modules()
        ):
            return None
    return lowest


def _trunk_tensors(decoder: nn.Module, lowest: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights and buffers that the hidden states entering block ``lowest`` depend on."""
    upper = tuple(f"layers.{i}." for i in range(lowest, len(decoder.layers)))
    for name, t in (*decoder.named_parameters(), *decoder.named_buffers()):
        if not name.startswith(upper):
            yield name, t


def _fingerprint(decoder: nn.Module, lowest: int) -> tuple:
    return (
        id(decoder),
        lowest,
        tuple(
            (name, id(t), t.data_ptr(), t._version, t.dtype, t.device) for name, t in _trunk_tensors(decoder, lowest)
        ),
    )


class _Replay(nn.Module):
    """Stands in for a frozen block: the lowest one returns the cached hidden states, the others pass them on."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor | None) -> None:
        super().__init__()
        self.hidden = hidden
        if hasattr(block, "attention_type"):  # read by some decoders' layer loops (per-layer masks)
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.hidden is None else self.hidden


#: ``forward(decoder, seqs, past)`` → (hidden, pass, last): the scorer's decoder pass (scoring.Scorer._forward).
Forward = Callable[[nn.Module, Sequence[list[int]], list], tuple]


def _nbytes(hidden: torch.Tensor, kept) -> int:
    """Bytes of an entry: its hidden states and, for a batch prefix, its keys and values."""
    tensors = [hidden]
    if kept is not None:
        tensors += [t for t in (*kept.keys, *kept.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


Path = tuple[Tokens, ...]


class TrunkCache:
    """Hidden states entering the lowest adapted block, per path of token segments.

    A path is a sequence of segments, each continuing the ones before it: a prompt ``(prompt,)``, an option's
    continuation ``(prompt, continuation)``, or, in a batch whose prompts share a prefix, ``(prefix,)``,
    ``(prefix, rest)`` and ``(prefix, rest, continuation)``. An entry holds the hidden states of the path's last
    segment, computed by running the trunk on each segment alone after the keys and values of the ones before it;
    so a path's entry is the same numbers whichever batch first asked for it. A batch prefix also keeps its own
    keys and values below the lowest adapted block, so that a later batch with the same prefix (ICL demonstrations)
    computes only its own prompts."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Path, tuple[torch.Tensor, object | None]] = OrderedDict()
        self._bytes = 0
        self._fingerprint: tuple | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def hidden(
        self,
        decoder: nn.Module,
        lowest: int,
        paths: Sequence[Path],
        forward: Forward,
        prefixes: frozenset[Path] = frozenset(),
        given: dict[Path, object] | None = None,
    ) -> list[torch.Tensor]:
        """The trunk's hidden states ``[length, d]`` of each path's last segment, computing the missing ones;
        ``prefixes``: paths whose keys and values below ``lowest`` are kept too; ``given``: keys and values of
        ancestor paths to continue from instead of running them (a kept ICL prefix, cropped)."""
        fingerprint = _fingerprint(decoder, lowest)
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint
        found: dict[Path, torch.Tensor] = {}
        for path in dict.fromkeys(paths):
            entry = self._entries.get(path)
            if entry is not None:
                self._entries.move_to_end(path)
                self.hits += 1
                found[path] = entry[0]
        missing = [p for p in dict.fromkeys(paths) if p not in found]
        if missing:
            self.misses += len(missing)
            passes: dict[Path, object] = dict(given or {})
            with torch.no_grad(), self.truncated(decoder, lowest) as captured:
                for path in missing:
                    found[path] = self._run(decoder, path, forward, captured, passes, prefixes)
        return [found[p] for p in paths]

    def prefix_pass(self, path: Path):
        """The keys and values below the lowest adapted block kept for a batch prefix, or None."""
        entry = self._entries.get(path)
        return None if entry is None else entry[1]

    def _run(self, decoder, path: Path, forward: Forward, captured: list, passes: dict, prefixes) -> torch.Tensor:
        """Run the trunk on ``path``'s last segment after its ancestors' keys and values (kept ones, or run now),
        store its hidden states, and return them."""
        past = []
        for i in range(1, len(path)):
            ancestor = path[:i]
            if ancestor not in passes:
                entry = self._entries.get(ancestor)
                if entry is not None and entry[1] is not None:
                    passes[ancestor] = entry[1]
                else:
                    self._run(decoder, ancestor, forward, captured, passes, prefixes)
            past.append((passes[ancestor], None))
        _, passes[path], _ = forward(decoder, [list(path[-1])], past)
        hidden = captured.pop()[0]
        self._store(path, hidden, passes[path] if path in prefixes else None)
        return hidden

    def _store(self, path: Path, hidden: torch.Tensor, kept) -> None:
        size = _nbytes(hidden, kept)
        if size > self.max_bytes:
            return
        old = self._entries.pop(path, None)
        if old is not None:
            self._bytes -= _nbytes(*old)
        self._entries[path] = (hidden, kept)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= _nbytes(*old)

    @staticmethod
    @contextmanager
    def truncated(decoder: nn.Module, lowest: int) -> Iterator[list[torch.Tensor]]:
        """Inside, the decoder runs only its blocks below ``lowest``; the list receives each pass's output of the
        last of them (the hidden states entering block ``lowest``, before any final norm)."""
        layers = decoder.layers
        captured: list[torch.Tensor] = []

        def keep(module, args, output):
            captured.append((output[0] if isinstance(output, tuple) else output).detach())

        handle = layers[lowest - 1].register_forward_hook(keep)
        decoder.layers = nn.ModuleList(list(layers[:lowest]))
        try:
            yield captured
        finally:
            decoder.layers = layers
            handle.remove()

    @staticmethod
    @contextmanager
    def replay(decoder: nn.Module, lowest: int, hidden: torch.Tensor) -> Iterator[None]:
        """Inside, the decoder's blocks below ``lowest`` are replaced by ``hidden`` ``[rows, length, d]``."""
        layers = decoder.layers
        stand_ins = [_Replay(layers[0], hidden)] + [_Replay(block, None) for block in layers[1:lowest]]
        decoder.layers = nn.ModuleList(stand_ins + list(layers[lowest:]))
        try:
            yield
        finally:
            decoder.layers = layers
