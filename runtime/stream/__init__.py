"""Real-time generation: a stream of frames in, a stream of pictures out (diffrt.Stream), and its WebSocket
endpoint and page (diffrt.stream.routes, needs the "serve" extra)."""

from diffrt.stream.config import GUIDANCE_MODES, MODES, StreamConfig, steps_for_strength
from diffrt.stream.ordering import DONE, DROPPED, SKIPPED, StreamFrame
from diffrt.stream.stream import Stream

__all__ = ["DONE", "DROPPED", "GUIDANCE_MODES", "MODES", "SKIPPED", "Stream", "StreamConfig", "StreamFrame",
           "steps_for_strength"]  # fmt: skip
