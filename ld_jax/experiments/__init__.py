"""The paper's experiments, each a composition of the library's pieces: persona (E1)."""
