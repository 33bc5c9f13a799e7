"""Distillation: the student and its state, the compiled (reward-guided) LCD step, the distillation job."""
