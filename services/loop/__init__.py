"""The SPR loop in one-machine mode: the whole stack on loopback, on embedded defaults."""
