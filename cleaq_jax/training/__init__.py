"""Training: how a stage starts, its train step and losses, the train state and the optimiser."""
