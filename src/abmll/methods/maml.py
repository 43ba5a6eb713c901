"""``maml``: MAML-en-LLM (Sinha et al., KDD 2024): MAML on the LoRA factors (METHOD.md section 6).

ABMLL's task-structured loop made deterministic (ΔW = μ, σ unused, β = γ = 0), i.e. ``structured-lora``,
with the meta-gradient of ``inner.order``:

- ``second_order``: differentiate the query loss at φᴷ through the K inner SGD steps back to θ (full MAML;
  SDPA's fused kernels have no double backward, so the math attention path is forced);
- ``first_order``: first-order MAML (FOMAML), the query-loss gradient at φᴷ applied to θ.

Library configs default to ``first_order`` (ABMLL's default), and :func:`abmll.methods.create_method`
leaves the order as configured. The ``maml`` preset of a comparison is second order: :attr:`default_overrides`
sets ``inner.order = second_order`` wherever the comparison's config leaves the order at the library default
(:func:`abmll.methods.method_config`, applied by ``abmll.compare.run_cell`` and recorded in the report).
"""

from __future__ import annotations

from abmll.methods.lora import StructuredLoRA


class MAML(StructuredLoRA):
    """MAML on deterministic LoRA factors; second order in its comparison preset."""

    name = "maml"
    default_overrides = {"inner.order": "second_order"}
