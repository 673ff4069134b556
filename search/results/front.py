"""The Pareto front of the complete trials, and the best value per objective so far."""

from dataclasses import dataclass

import numpy as np

from search.fitness import Objectives
from search.results.statistics import hypervolume, pareto_front


@dataclass(frozen=True)
class Front:
    members: list[int]  # trial numbers on the front, best mean fitness first
    points: np.ndarray  # (complete trials, objectives)
    best: dict[str, float]  # objective -> best value any complete trial reached
    hypervolume: float

    @classmethod
    def of(cls, completed: dict[int, list[float]], objectives: Objectives) -> "Front":
        numbers = list(completed)
        points = np.array([completed[n] for n in numbers], dtype=float).reshape(len(numbers), len(objectives.keys))
        if not numbers:
            return cls([], points, {}, 0.0)
        members = [numbers[i] for i in pareto_front(points, objectives.directions)]
        members.sort(key=lambda n: -objectives.mean_fitness(completed[n]))
        signed = points * objectives.signs()
        best = {key: float(points[np.argmax(signed[:, i]), i]) for i, key in enumerate(objectives.keys)}
        volume = hypervolume(points, objectives.directions, objectives.reference())
        return cls(members, points, best, volume)
