"""diffrt: a performance-first inference runtime for diffusion image models.

Importing diffrt compiles no kernel and touches no GPU; the heavy pieces load on first use.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy re-exports keep `import diffrt` cheap (no torch model code, no Triton) until something is used.
    if name == "load_model":
        from diffrt.loading import load_model

        return load_model
    if name == "Pipeline":
        from diffrt.pipeline import Pipeline

        return Pipeline
    if name == "GenerationRequest":
        from diffrt.request import GenerationRequest

        return GenerationRequest
    if name in ("Stream", "StreamConfig"):
        from diffrt import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'diffrt' has no attribute {name!r}")
