"""Runtime: the device mesh and multi-process start-up, checkpoints and preemption, local and gs://
storage, and the console."""
