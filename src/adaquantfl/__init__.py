"""adaquantfl: communication-efficient federated learning with adaptive quantization."""

__version__ = "0.1.0"
