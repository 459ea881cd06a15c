"""The /stream page in headless Chromium (Debian's, driven over CDP): with no camera it sends its moving test
pattern, pictures arrive and are shown, with their rate; a screenshot records it."""

import io
import os

import numpy as np
import pytest
from PIL import Image

import diffrt
from diffrt.cli_generate import DEFAULT_MODEL
from diffrt.stream import StreamConfig
from diffrt.stream.routes import stream_router
from diffrt.stream.session import stream_factory
from tests.helpers.cdp import chromium, chromium_path
from tests.helpers.stream_fixtures import RED_CIRCLE, one_thread  # noqa: F401 (a fixture)
from tests.helpers.stream_server import serve

SCREENSHOT_DIR = os.environ.get("DIFFRT_SCREENSHOT_DIR")  # keep the screenshot here (default: the test's tmp dir)


@pytest.mark.skipif(chromium_path() is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
def test_the_page_streams_its_test_pattern(tmp_path):
    pipe = diffrt.Pipeline.from_pretrained(DEFAULT_MODEL)
    defaults = StreamConfig(prompt=RED_CIRCLE, height=64, width=64, steps=(0, 2), num_inference_steps=4)
    with serve(stream_router(stream_factory(pipe, defaults), max_sessions=1)) as url, chromium(chromium_path()) as b:
        page = b.open(url + "/stream?source=pattern")
        # Stats and what is shown read in one evaluation: between frames the picture's src is being replaced, so a
        # later read can catch it with no image decoded yet.
        stats, shown = page.wait_for(
            "((s, img) => s && (s.closed || s.received >= 4 && s.fps > 0 && img.naturalWidth > 0)"
            " && [s, [img.naturalWidth, document.getElementById('fps').textContent,"
            " document.getElementById('source-kind').textContent]])"
            "(window.streamStats, document.getElementById('result'))", 90)  # fmt: skip
        rect = page.evaluate("(r => [r.x, r.y, r.width, r.height])(document.getElementById('result')"
                             ".getBoundingClientRect())")  # fmt: skip
        png = page.screenshot(os.path.join(SCREENSHOT_DIR or tmp_path, "stream_page.png"))
    assert stats["source"] == "pattern" and stats["errors"] == 0 and stats["outOfOrder"] == 0, stats
    assert stats["sent"] >= stats["received"] >= 4 and stats["closed"] is None, stats
    assert shown[0] == 64 and float(shown[1]) > 0 and shown[2] == "test pattern", shown
    screenshot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    x, y, w, h = (int(round(v)) for v in rect)
    picture = screenshot[y : y + h, x : x + w]
    assert picture.shape[0] > 100 and picture.std() > 10, "the shown picture is blank in the screenshot"
