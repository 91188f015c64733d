"""The FusionBench adapter: the wrapped base merger, the model pool it sees, the wrapper skeleton, LARV on it, and choosing one value on validation data."""
