"""What every training job shares: the loop, typed state, optimizer factory, checkpoints, metrics, evaluators."""
