"""Built-in selection strategies; importing this package registers them."""
from deltatune.select.strategies import dedup, diversity, got_d, grape, quality  # noqa: F401
