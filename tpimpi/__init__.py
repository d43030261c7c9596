"""tpimpi: tensor-parallel LLM inference over MPI for clusters of small devices."""

__version__ = "0.1.0"
