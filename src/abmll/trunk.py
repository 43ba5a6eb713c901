"""The frozen-trunk cache (``scoring.trunk_cache_mb``): when adapters sit on the top blocks only (``lora.layers``),
the decoder blocks below the lowest adapted one never change, so the hidden states entering that block are a
function of the tokens alone. The scorer records them from its own passes, per prompt (or batch prefix and each
prompt's rest) and per option continuation, in RAM (least recently used out first, within a byte budget); a
later call whose prompts and options are all kept, inner or outer step, support or query, weight sample or
test-time step, of any method, replays them and runs only the adapted blocks. A call with anything new runs
every block, as without the cache, and records what it meets.

A batch scored again gives the numbers of its first call bit for bit (the recorded values are that call's). An
example met again in another batch gives them within float rounding: its entry carries the rounding of the batch
it was recorded in, so a resumed run may differ from an uninterrupted one in the last bits. Against the path
without the cache the scores and gradients agree up to float rounding (tests/test_trunk_cache.py).

The cache belongs to one scorer and one trunk: it is emptied when the lowest adapted block changes or when any
weight or buffer of the trunk (embeddings and the blocks below) is replaced or modified in place (a fingerprint
of their identities and version counters, read at every call). Keys are token ids, so a change of tokenizer,
prompt format or truncation makes new entries rather than stale hits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
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
    """Stands in for a frozen block: the lowest one returns the kept hidden states, the others pass them on."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor | None) -> None:
        super().__init__()
        self.hidden = hidden
        if hasattr(block, "attention_type"):  # read by some decoders' layer loops (per-layer masks)
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.hidden is None else self.hidden


#: A path of token segments, each continuing the ones before it: ``(prompt,)``, ``(prompt, continuation)``, or in
#: a batch whose prompts share a prefix ``(prefix,)``, ``(prefix, rest)`` and ``(prefix, rest, continuation)``.
Path = tuple[Tokens, ...]


class TrunkCache:
    """Hidden states entering the lowest adapted block, per path of token segments (its last segment's
    positions), recorded from the scorer's own passes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Path, torch.Tensor] = OrderedDict()
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

    def lookup(self, decoder: nn.Module, lowest: int, paths: Sequence[Path]) -> list[torch.Tensor] | None:
        """Every path's hidden states ``[length, d]`` when all of them are kept; else None (the call then runs the
        trunk and records them)."""
        fingerprint = _fingerprint(decoder, lowest)
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint
        found = [self._entries.get(path) for path in paths]
        if any(h is None for h in found):
            self.misses += 1
            return None
        self.hits += 1
        for path in paths:
            self._entries.move_to_end(path)
        return found

    def store(self, paths: Sequence[Path], hidden: Sequence[torch.Tensor]) -> None:
        """Keep each path's hidden states (least recently used out first, within the byte budget)."""
        for path, h in zip(paths, hidden, strict=True):
            size = h.numel() * h.element_size()
            if size > self.max_bytes:
                continue
            old = self._entries.pop(path, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._entries[path] = h
            self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    @staticmethod
    @contextmanager
    def capture(decoder: nn.Module, lowest: int) -> Iterator[list[torch.Tensor]]:
        """Inside, the list receives each pass's output of block ``lowest - 1`` (detached): the hidden states
        entering block ``lowest``."""
        captured: list[torch.Tensor] = []

        def keep(module, args, output):
            captured.append((output[0] if isinstance(output, tuple) else output).detach())

        handle = decoder.layers[lowest - 1].register_forward_hook(keep)
        try:
            yield captured
        finally:
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
