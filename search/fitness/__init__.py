"""The fitness room: what candidates are scored on and how scores become an optimizer's values."""

from search.fitness.objectives import Objectives

__all__ = ["Objectives"]
