"""Built-in delta methods; importing this package registers them."""
from deltatune.methods import ia3, lora  # noqa: F401
