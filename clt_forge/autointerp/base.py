"""The explainer interface and its registry (explainers.py holds the LLM kinds, tokens.py the
evidence-only one; a new backend is one class decorated with `@EXPLAINERS.register("name")`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from clt_forge.artifacts.features import FeatureEvidence
from clt_forge.autointerp.prompts import clean_explanation, explanation_messages
from clt_forge.config.schema import ExplainerConfig
from clt_forge.registry import Registry

__all__ = ["EXPLAINERS", "NO_EXPLAINER", "Explainer", "Messages"]

Messages = Sequence[dict[str, str]]


class Explainer(ABC):
    """A language model that explains features and judges detection questions."""

    @abstractmethod
    def explain(self, messages_batch: Sequence[Messages]) -> list[str]:
        """The text answer to each chat prompt, in order."""

    @abstractmethod
    def judge(self, questions: Sequence[Messages]) -> list[float]:
        """For each yes/no question, a score in [0, 1] that the answer is yes."""

    def sample(self, messages_batch: Sequence[Messages], n: int) -> list[list[str]]:
        """`n` more answers per prompt, sampled (kinds that cannot sample give none)."""
        return [[] for _ in messages_batch]

    def describe(self, evidence: Sequence[FeatureEvidence], candidates: int = 1) -> list[list[str]]:
        """Candidate explanations of each feature, cleaned (the first is the `explain` answer)."""
        messages = [explanation_messages(e) for e in evidence]
        first = self.explain(messages)
        more = self.sample(messages, candidates - 1) if candidates > 1 else [[] for _ in messages]
        return [
            list(dict.fromkeys(clean_explanation(a) for a in [one, *rest]))
            for one, rest in zip(first, more, strict=True)
        ]

    def close(self) -> None:
        """Release the model / connections (idempotent)."""
        return None

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NO_EXPLAINER = "none"  # explainer.kind=none: statistics and examples only
EXPLAINERS: Registry[Callable[[ExplainerConfig], Explainer]] = Registry("explainer.kind", extra=(NO_EXPLAINER,))
