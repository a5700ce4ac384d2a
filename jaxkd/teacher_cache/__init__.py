"""The teacher's top-k log-probs, captured once and read back for training without the teacher model."""
