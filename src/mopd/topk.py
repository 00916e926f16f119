"""Top-K forward KL targets: every teacher's top-K, renormalised, blended by weight.

For each completion position every teacher returns its K most likely next
tokens with their logprobs. Each teacher's candidates are renormalised to a
distribution ``p_i``, the distributions are mixed over the union of their ids
as ``sum_i w_i p_i / sum_i w_i``, the K most likely ids are kept and
renormalised again. The student trains with cross-entropy on these soft
targets. The teacher logprob of the sampled token, kept for the reverse-KL
metric, is the log of the same weighted mixture of the teachers' full
probabilities of that token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio

from mopd.backends.base import ScoredCompletion, TeacherScorer
from mopd.errors import ConfigError
from mopd.types import TopKTargets


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    """One teacher of a blend."""

    scorer: TeacherScorer
    weight: float


def _renormalise(logprobs_K: Sequence[float]) -> tuple[list[float], float]:
    """Return the softmax of ``logprobs_K`` and the probability mass they held."""
    top = max(logprobs_K)
    exps = [math.exp(v - top) for v in logprobs_K]
    total = sum(exps)
    return [e / total for e in exps], math.exp(top) * total


def blend_position(
    candidates: Sequence[tuple[float, Sequence[int], Sequence[float]]], *, k: int
) -> tuple[tuple[int, ...], tuple[float, ...], float, float]:
    """Blend one position's candidates from several teachers.

    :param candidates: per teacher, ``(weight, ids_K, logprobs_K)``.
    :returns: kept ids and their probabilities (most likely first), the weighted
        mean top-K mass before renormalising, and the entropy of the kept targets.
    """
    total_weight = sum(weight for weight, _, _ in candidates)
    mixture: dict[int, float] = {}
    mass = 0.0
    for weight, ids_K, logprobs_K in candidates:
        probs_K, teacher_mass = _renormalise(logprobs_K)
        mass += weight * teacher_mass / total_weight
        for token_id, prob in zip(ids_K, probs_K, strict=True):
            mixture[token_id] = mixture.get(token_id, 0.0) + weight * prob / total_weight

    kept = sorted(mixture.items(), key=lambda item: (-item[1], item[0]))[:k]
    kept_total = sum(prob for _, prob in kept)
    ids = tuple(token_id for token_id, _ in kept)
    probs = tuple(prob / kept_total for _, prob in kept)
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    return ids, probs, mass, entropy


def blend_completion(teachers: Sequence[tuple[float, ScoredCompletion]], *, k: int) -> ScoredCompletion:
    """Blend the scores several teachers gave one completion into top-K targets.

    The first teacher failure (or a teacher without top-K candidates) fails the sample.
    """
    for _, scored in teachers:
        if scored.failure is not None:
            return ScoredCompletion(logprobs_T=None, failure=scored.failure)
        if scored.logprobs_T is None or scored.topk_ids_TK is None or scored.topk_logprobs_TK is None:
            return ScoredCompletion(logprobs_T=None, failure="missing_topk")
    lengths = {len(scored.logprobs_T or ()) for _, scored in teachers}
    lengths |= {len(scored.topk_ids_TK or ()) for _, scored in teachers}
    if len(lengths) != 1:
        return ScoredCompletion(logprobs_T=None, failure="length_mismatch")
    count = lengths.pop()

    total_weight = sum(weight for weight, _ in teachers)
    ids_TK, probs_TK, mass_T, entropy_T, logprobs_T = [], [], [], [], []
    for position in range(count):
        candidates = []
        for weight, scored in teachers:
            ids_K = scored.topk_ids_TK[position]  # type: ignore[index]
            logprobs_K = scored.topk_logprobs_TK[position]  # type: ignore[index]
            if not ids_K or any(not math.isfinite(v) for v in logprobs_K):
                return ScoredCompletion(logprobs_T=None, failure="missing_topk")
            candidates.append((weight, ids_K, logprobs_K))
        ids, probs, mass, entropy = blend_position(candidates, k=k)
        ids_TK.append(ids)
        probs_TK.append(probs)
        mass_T.append(mass)
        entropy_T.append(entropy)

        # Mixture probability of the sampled token; a non-finite teacher value stays non-finite.
        values = [scored.logprobs_T[position] for _, scored in teachers]  # type: ignore[index]
        if all(math.isfinite(v) for v in values):
            mixed = sum(w * math.exp(v) for (w, _), v in zip(teachers, values, strict=True)) / total_weight
            logprobs_T.append(math.log(mixed) if mixed > 0 else -math.inf)
        else:
            logprobs_T.append(math.nan)

    echoed = next((scored.echoed_ids_T for _, scored in teachers if scored.echoed_ids_T is not None), None)
    targets = TopKTargets(ids_TK=tuple(ids_TK), probs_TK=tuple(probs_TK), mass_T=tuple(mass_T),
                          entropy_T=tuple(entropy_T))
    return ScoredCompletion(logprobs_T=tuple(logprobs_T), echoed_ids_T=echoed, targets=targets)


class BlendedScorer:
    """Scorer of one route for ``topk_forward_kl``: requests top-K from each of its teachers and blends them.

    :param k: candidates requested from every teacher and kept after blending.
    """

    def __init__(self, *, name: str, teachers: Sequence[WeightedScorer], k: int) -> None:
        if not teachers:
            raise ValueError(f"route {name!r} has no teacher to blend")
        self.name = name
        self._teachers = list(teachers)
        self._k = k

    async def score(
        self, prompt_ids_T: Sequence[int], completions_S: Sequence[Sequence[int]], *, top_k: int = 0
    ) -> list[ScoredCompletion]:
        k = top_k or self._k
        results: list[list[ScoredCompletion]] = [[] for _ in self._teachers]

        async def one(index: int, teacher: WeightedScorer) -> None:
            results[index] = await teacher.scorer.score(prompt_ids_T, completions_S, top_k=k)

        async with anyio.create_task_group() as tg:
            for index, teacher in enumerate(self._teachers):
                tg.start_soon(one, index, teacher)

        blended = []
        for sample in range(len(completions_S)):
            per_teacher = [(teacher.weight, results[i][sample]) for i, teacher in enumerate(self._teachers)]
            blended.append(blend_completion(per_teacher, k=k))
        return blended

    async def aclose(self) -> None:
        return None


def blend_scorers(
    scorers: Mapping[str, TeacherScorer],
    *,
    weights: Mapping[str, float],
    k: int,
    mode: str,
    own_route_factor: float = 1.0,
) -> dict[str, BlendedScorer]:
    """Build one blending scorer per route.

    :param mode: ``all`` blends every teacher into every route's targets;
        ``route`` uses only the route's own teacher.
    :param own_route_factor: multiplies the weight of the row's own teacher in
        its route's blend, so the specialist leads while the others still add
        their candidates.
    """
    blended = {}
    for route in scorers:
        names = sorted(scorers) if mode == "all" else [route]
        teachers = [
            WeightedScorer(scorer=scorers[name],
                           weight=weights.get(name, 1.0) * (own_route_factor if name == route else 1.0))
            for name in names
        ]
        blended[route] = BlendedScorer(name=route, teachers=teachers, k=k)
    return blended


def check_topk_size(k: int, *, vocab_size: int) -> None:
    """Reject a K the student's vocabulary cannot fill.

    :raises ConfigError: naming MOPD_TOPK and the limit.
    """
    if k > vocab_size:
        raise ConfigError(
            f"MOPD_TOPK={k} is above the vocabulary size {vocab_size}, the most candidates a teacher can return; "
            "lower MOPD_TOPK"
        )
