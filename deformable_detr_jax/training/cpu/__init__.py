"""What makes the training step fast on a CPU host, applied from the step factory only."""
