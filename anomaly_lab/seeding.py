"""Seeds derived from the run's seed, so that every random stream is a function of where it is used."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 32-bit seed hashed from integers, e.g. (run seed, epoch, index): distinct parts give unrelated streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
