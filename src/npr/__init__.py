"""npr: Native Parallel Reasoner — train, evaluate and serve models that reason in parallel branches."""

__version__ = "0.1.0"
