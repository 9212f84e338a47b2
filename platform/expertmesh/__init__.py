"""ExpertMesh: train and serve DeepSeek-V3-style Mixture-of-Experts models on Ray."""

__version__ = "0.1.0"
