"""The coordinator: the ServerApp round loop, central evaluation, checkpoints and resume, results."""
