"""Built-in delta methods; importing this package registers them."""
from deltatune.methods import lora  # noqa: F401
