"""Reward models for reward-guided LCD: ``load_reward(name_or_sum, path)`` -> `RewardModel`."""
from jaxlcd.rewards.base import RewardModel, weighted_sum
from jaxlcd.rewards.registry import LOADERS, RewardError, load_reward, parse_reward_expression

__all__ = ["RewardModel", "RewardError", "LOADERS", "load_reward", "parse_reward_expression", "weighted_sum"]
