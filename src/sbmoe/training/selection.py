"""Model selection: which of a run's evaluated models it ships, by dev nDCG@10."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sbmoe.core.io import atomic_directory, recover_directory
from sbmoe.model.retriever import Retriever


class ModelSelection:
    """Keeps the best model on dev nDCG@10 so far (policy ``best``) or the last evaluated one (``last``).

    The kept model is saved to ``folder`` (atomically) whenever it changes, so a resumed run still
    has it; the scores of every evaluation stay in :attr:`history`.

    Args:
        policy: ``best`` or ``last``.
        folder: Where the kept model is saved (``training/best``).
        writes: Whether this process saves it (rank 0 only).
    """

    def __init__(self, policy: str, folder: Path, writes: bool = True) -> None:
        self.policy = policy
        self.folder = folder
        self.writes = writes
        self.best_score: float | None = None
        self.best_step = 0
        self.history: list[dict[str, float]] = []

    def consider(self, retriever: Retriever, step: int, epoch: int, score: float) -> bool:
        """Record the model of ``step`` scoring ``score``; keep it if the policy says so.

        Returns:
            Whether it beat every earlier score.
        """
        self.history.append({"step": step, "epoch": epoch, "dev_ndcg@10": score})
        improved = self.best_score is None or score > self.best_score
        if self.policy == "last" or improved:
            self.best_score, self.best_step = score, step
            if self.writes:
                with atomic_directory(self.folder) as tmp:
                    retriever.save(tmp, extra={"step": step, "dev_ndcg@10": score})
        return improved

    def kept_model(self) -> Retriever:
        """The kept model, loaded on the CPU."""
        recover_directory(self.folder)  # a kill between the two renames of a save leaves it aside
        return Retriever.load(str(self.folder), device="cpu")

    def untrained_warning(self, steps: int, has_head: bool) -> str | None:
        """Why the kept model is the untrained start, if it is (policy ``best`` only)."""
        if self.policy != "best" or self.best_step != 0 or steps == 0:
            return None
        return (
            f"no trained checkpoint beat the starting model on dev nDCG@10 ({self.best_score:.4f}): "
            f"the saved model is the UNTRAINED start (best_step 0"
            + (", its MoE head at its random initialisation" if has_head else "")
            + "); train longer, or keep the last checkpoint with --checkpoint-selection last"
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (plain data)."""
        return {"best_score": self.best_score, "best_step": self.best_step, "dev_history": self.history}

    def restore(self, state: dict[str, Any]) -> None:
        """Go on from a checkpoint's :meth:`state`."""
        self.best_score = state["best_score"]
        self.best_step = state["best_step"]
        self.history = list(state["dev_history"])
