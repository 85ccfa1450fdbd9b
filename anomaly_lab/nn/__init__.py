"""Building blocks shared by two methods or more."""
