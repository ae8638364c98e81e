"""sdstudio: Stable Diffusion generation, editing, training and evaluation."""

__version__ = "0.1.0"
