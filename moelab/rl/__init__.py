"""Reinforcement-learning fine-tuning (GRPO) with routing replay; see docs/rl.md."""
