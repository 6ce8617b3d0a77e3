"""The paper's experiments, each a composition of the library's pieces: persona (E1),
percentiles (E2) and unalign (E3)."""
