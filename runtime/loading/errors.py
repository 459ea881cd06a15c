"""The one error type weight loading raises: a ValueError whose message names the file and the key."""

import functools


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: malformed, unsafe without opt-in, or not matching the model."""


PICKLE_RISK = (
    "Pickle checkpoints (.ckpt/.pt/.bin) can run arbitrary code when loaded; diffrt loads safetensors by default. "
    "If you trust this file, opt in with allow_pickle=True (Python) or --allow-pickle (CLI); it is then read with "
    "torch.load(weights_only=True), which restricts unpickling to tensors and plain containers. "
    "Better: convert it once to .safetensors."
)


def missing_key_errors(what: str):
    """Decorate a converter `f(state_dict, where, ...)`: a KeyError inside (a key its layout implies is absent)
    becomes a CheckpointError naming `where` and the key."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(sd, where, *args, **kwargs):
            try:
                return f(sd, where, *args, **kwargs)
            except KeyError as e:
                raise CheckpointError(
                    f"{where}: {what} key {e} is missing (the blocks around it are incomplete)"
                ) from e

        return wrapper

    return decorate
