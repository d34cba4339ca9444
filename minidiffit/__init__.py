"""minidiffit: DiffiT, readable."""
