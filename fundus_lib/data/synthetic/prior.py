"""The DR x DME class prior the synthetic generator draws its target grades from (SYNTHETIC data).

Default: IDRiD's joint label distribution (CANet, Li et al., TMI 2020, Table III); cells the
grading rules cannot produce are refused.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

#: A prior argument: "idrid", "balanced" or a 5x3 DR x DME weight table.
PriorSpec = Union[str, Sequence[Sequence[float]], np.ndarray]

#: IDRiD label counts, rows DR 0-4, columns DME 0-2 (CANet paper, Table III; 516 images).
IDRID_PRIOR: np.ndarray = np.array([[134, 0, 0],
                                    [18, 0, 0],
                                    [36, 24, 140],
                                    [5, 4, 116],
                                    [4, 2, 33]], dtype=float)
IDRID_PRIOR.setflags(write=False)

#: Which (DR, DME) cells the grading rules can produce: DME > 0 needs HaEx; HaEx alone is DR 0,
#: HaEx with MA is DR >= 2, so DR 1 (MA only) never has DME.
FEASIBLE_CELLS: np.ndarray = np.ones((5, 3), dtype=bool)
FEASIBLE_CELLS[1, 1:] = False
FEASIBLE_CELLS.setflags(write=False)

#: ``"balanced"`` prior: each DR grade 1/5; within DR 2-4 the three DME grades equally likely.
BALANCED_PRIOR: np.ndarray = np.array([[3, 0, 0], [3, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=float)
BALANCED_PRIOR.setflags(write=False)


def resolve_prior(prior: PriorSpec) -> np.ndarray:
    """The (5, 3) DR x DME probability table for ``prior``: ``"idrid"``, ``"balanced"`` or weights.

    Weights must be finite, non-negative, not all zero, and zero on the impossible cells
    (DR 1 with DME 1-2).
    """
    if isinstance(prior, str):
        tables = {"idrid": IDRID_PRIOR, "balanced": BALANCED_PRIOR}
        if prior not in tables:
            raise ValueError(f"prior must be one of {sorted(tables)} or a 5x3 DR x DME weight table, got {prior!r}")
        table = np.array(tables[prior])
    else:
        table = np.asarray(prior, dtype=float)
    if table.shape != (5, 3):
        raise ValueError(f"prior must have shape (5, 3) (DR 0-4 x DME 0-2), got {table.shape}")
    if not np.all(np.isfinite(table)) or np.any(table < 0) or table.sum() <= 0:
        raise ValueError("prior weights must be finite, non-negative and not all zero")
    if np.any(table[~FEASIBLE_CELLS] > 0):
        raise ValueError("prior puts weight on DR 1 with DME 1-2, which the grading rules cannot produce "
                         "(DME needs a hard exudate, and a hard exudate beside microaneurysms makes DR >= 2)")
    return table / table.sum()
