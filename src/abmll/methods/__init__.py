"""Training algorithms behind one interface (:class:`Method`)."""

from abmll.methods.abmll import ABMLL
from abmll.methods.base import MetaBatches, Method

METHODS: dict[str, type[Method]] = {ABMLL.name: ABMLL}

__all__ = ["ABMLL", "METHODS", "MetaBatches", "Method"]
