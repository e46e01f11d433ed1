"""Error budget for semantic hits, with online evidence (issue 13, vCache-style).

The pair verifier gives each candidate a calibrated probability ``p`` that serving it is right.
A namespace with budget ``e`` (``semantic.max_error_rate``, per-namespace overridable) serves a
hit when ``p >= cut``. The cut starts at the calibrated one (held-out calibration pairs) and then
follows evidence from this deployment's own traffic:

* audits (``semantic.audit_rate``): a sampled semantic hit is also asked upstream and the two
  answers compared; the verdict is one observation ``(p, right)``;
* feedback (``POST /v1/feedback`` with ``rating: bad``): an observation ``(p, wrong)``.

The error expected at a cut ``c`` is a Beta-Binomial posterior mean over the observations with
``p >= c``, whose prior is the calibration curve ``e0(c)`` worth ``prior_weight`` pseudo
observations: ``(k(c) + m e0(c)) / (n(c) + m)``. The namespace's cut is the lowest grid cut whose
estimate is within the budget, so wrong hits raise it and a run of right audits lets it fall back
towards what the calibration allows (never below the calibrated curve's own answer with no
evidence at the same budget... unless the audits show that traffic is easier).

A bad rating also marks the served entry's neighbourhood: candidates within cosine
``neighbourhood`` of a badly rated entry must beat the ``p`` that entry was served at.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BudgetController", "NamespaceEvidence"]


@dataclass(slots=True)
class NamespaceEvidence:
    """Observations of one namespace: (p, wrong) pairs sorted by p, and bad neighbourhoods."""

    ps: list[float] = field(default_factory=list)  # sorted
    wrong: list[int] = field(default_factory=list)  # aligned with ps
    audits: int = 0
    audit_errors: int = 0
    feedback_bad: int = 0
    served: int = 0
    cut: float | None = None
    bad_vecs: deque[tuple[np.ndarray, float]] = field(default_factory=lambda: deque(maxlen=256))


class BudgetController:
    """Per-namespace cuts from a calibration curve plus online evidence. Loop-only (no locks)."""

    def __init__(
        self,
        curve: list[tuple[float, float]],
        *,
        base_cut: Callable[[float], float] | None = None,
        default_budget: float = 0.01,
        prior_weight: float = 200.0,
        max_observations: int = 4096,
        neighbourhood: float = 0.92,
        max_namespaces: int = 10_000,
    ) -> None:
        """curve: (cut, calibration error at that cut) ascending in cut."""
        self.base_cut = base_cut  # the calibrated cut per budget (used until evidence arrives)
        self.grid = [float(c) for c, _ in sorted(curve)]
        self.e0 = [float(e) for _, e in sorted(curve)]
        self.default_budget = default_budget
        self.prior_weight = prior_weight
        self.max_observations = max_observations
        self.neighbourhood = neighbourhood
        self.max_namespaces = max_namespaces
        self._ns: OrderedDict[str, NamespaceEvidence] = OrderedDict()

    def _state(self, ns: str) -> NamespaceEvidence:
        """The namespace's evidence, most recently used last. Bounded: past max_namespaces the
        least recently used one is forgotten, so a caller making up namespaces can push out
        only evidence nobody has used since, never an active namespace's raised cut."""
        d = self._ns
        st = d.get(ns)
        if st is None:
            if len(d) >= self.max_namespaces:
                d.popitem(last=False)
            st = d[ns] = NamespaceEvidence()
        else:
            d.move_to_end(ns)
        return st

    def _observed(self, st: NamespaceEvidence, i: int) -> tuple[int, int]:
        """(observations, wrong ones) among those with p at or above grid cut i."""
        j = bisect.bisect_left(st.ps, self.grid[i])
        n = len(st.ps) - j
        return n, (sum(st.wrong[j:]) if n else 0)

    def estimate(self, st: NamespaceEvidence, i: int) -> float:
        """Posterior mean error among hits at grid cut i."""
        n, k = self._observed(st, i)
        m = self.prior_weight
        return (k + m * self.e0[i]) / (n + m)

    def upper(self, st: NamespaceEvidence, i: int) -> float:
        """The estimate plus one posterior standard deviation (about an 84 % upper bound)."""
        n, k = self._observed(st, i)
        m = self.prior_weight
        mean = (k + m * self.e0[i]) / (n + m)
        return mean + math.sqrt(mean * (1.0 - mean) / (n + m + 1.0))

    def _lowest_within(self, f: Callable[[int], float], e: float) -> float:
        """The lowest grid cut from which on (every higher cut too) ``f`` is within ``e``."""
        for i in range(len(self.grid) - 1, -1, -1):
            if f(i) > e:
                return self.grid[i + 1] if i + 1 < len(self.grid) else 1.0
        return self.grid[0]

    def cut(self, ns: str, budget: float | None = None) -> float:
        """The probability a hit needs in namespace ns (cached until new evidence).

        Evidence of errors raises the cut as far as the posterior mean asks; evidence of right
        hits lowers it below the calibrated cut only as far as the upper bound allows (a few
        lucky audits must not spend the budget: the replay of banking77 drifted to 2.5 %
        realised error on the mean alone)."""
        return self._cut(self._state(ns), budget)

    def _cut(self, st: NamespaceEvidence, budget: float | None) -> float:
        if st.cut is None:
            e = self.default_budget if budget is None else budget
            base = self.base_cut(e) if self.base_cut is not None else None
            if not st.ps and base is not None:
                st.cut = base  # no evidence yet: exactly the calibrated cut
                return st.cut
            by_mean = self._lowest_within(lambda i: self.estimate(st, i), e)
            if base is None:
                st.cut = by_mean
            else:
                by_upper = self._lowest_within(lambda i: self.upper(st, i), e)
                st.cut = max(by_mean, min(base, by_upper))
        return st.cut

    def allow(self, ns: str, p: float, cand_vec: np.ndarray | None, budget: float | None) -> bool:
        """Whether a candidate with probability p may be served in namespace ns."""
        if p < self.cut(ns, budget):
            return False
        st = self._ns[ns]
        if cand_vec is not None and st.bad_vecs:
            v = np.asarray(cand_vec, np.float32).reshape(-1)
            for bad, p_bad in st.bad_vecs:
                if float(v @ bad) >= self.neighbourhood and p <= p_bad:
                    return False
        return True

    def observe(self, ns: str, p: float, wrong: bool, *, audit: bool = True) -> None:
        """One verdict on a served hit (audit or feedback): update the evidence, reset the cut."""
        st = self._state(ns)
        i = bisect.bisect_left(st.ps, p)
        st.ps.insert(i, float(p))
        st.wrong.insert(i, int(wrong))
        if len(st.ps) > self.max_observations:  # keep the bound: drop a right, low-p one
            j = next((k for k, w in enumerate(st.wrong) if not w), 0)
            del st.ps[j], st.wrong[j]
        if audit:
            st.audits += 1
            st.audit_errors += int(wrong)
        st.cut = None

    def bad_feedback(self, ns: str, p: float, cand_vec: np.ndarray | None) -> None:
        """A user rated a served hit bad: an error observation and a stricter neighbourhood."""
        st = self._state(ns)
        st.feedback_bad += 1
        self.observe(ns, p, True, audit=False)
        if cand_vec is not None:
            v = np.asarray(cand_vec, np.float32).reshape(-1)
            n = float(np.linalg.norm(v))
            if n > 0 and math.isfinite(n):
                st.bad_vecs.append((v / n, float(p)))

    def served(self, ns: str) -> None:
        self._state(ns).served += 1

    def snapshot(self, limit: int | None = None) -> dict[str, dict[str, float | int]]:
        """Per namespace (the ``limit`` most recently used, newest first; all by default): cut,
        estimated error at it, audits, audit errors, bad ratings."""
        out: dict[str, dict[str, float | int]] = {}
        items = list(self._ns.items())
        for ns, st in reversed(items if limit is None else items[-limit:]):
            cut = self._cut(st, None)
            i = min(bisect.bisect_left(self.grid, cut), len(self.grid) - 1)
            out[ns] = {
                "cut": round(cut, 5),
                "estimated_error_rate": round(self.estimate(st, i), 5),
                "semantic_hits": st.served,
                "audits": st.audits,
                "audit_disagreements": st.audit_errors,
                "feedback_bad": st.feedback_bad,
            }
        return out
