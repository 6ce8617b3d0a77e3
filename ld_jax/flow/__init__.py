"""The unconstrained features model of SPEC §5 (paper Section 4): free hidden embeddings and
unembeddings trained by gradient flow, closed forms of Theorems 4–9 and Propositions 1–2, their
verification against autodiff, the paper's qualitative claims, and simulated scenarios.

state -> dynamics (loss, flow) -> theorems (closed forms) -> verify / claims / simulate.
Entry points run in float64 (`state.float64`); importing this package changes no jax setting.
"""
