"""Preference training: optimizers (`optim`), state, the jitted sharded step, checkpoints and the
one training loop every experiment uses (`loop.train`)."""
