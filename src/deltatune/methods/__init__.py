"""Built-in delta methods; importing this package registers them."""
from deltatune.methods import bitfit, bottleneck, ia3, lora, norm_tuning, ssf  # noqa: F401
from deltatune.methods import bundle, prefix, prompt  # noqa: F401
from deltatune.methods import compacter, lofit  # noqa: F401
from deltatune.methods import dsee, hft, lift, lt_sft, sparse_dynamic  # noqa: F401
