"""Weight matching: find the symmetry π that aligns one checkpoint to another."""
from rebasin.matching.api import match
from rebasin.matching.engine import GroupStats, MatchResult, match_states, objective

__all__ = ["GroupStats", "MatchResult", "match", "match_states", "objective"]
