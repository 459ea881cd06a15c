"""The one error type weight loading raises: a ValueError whose message names the file and the key."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: malformed, unsafe without opt-in, or not matching the model."""


PICKLE_RISK = (
    "Pickle checkpoints (.ckpt/.pt/.bin) can run arbitrary code when loaded; diffrt loads safetensors by default. "
    "If you trust this file, opt in with allow_pickle=True (Python) or --allow-pickle (CLI); it is then read with "
    "torch.load(weights_only=True), which restricts unpickling to tensors and plain containers. "
    "Better: convert it once to .safetensors."
)
