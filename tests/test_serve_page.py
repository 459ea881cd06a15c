"""The web page at `/` in Debian's headless Chromium: a prompt typed and submitted, the progress bar filled by the
server-sent events, and the screenshot of the page shows the picture (the judge reads the prompt in it, and its
pixels are the ones the server sent)."""

import numpy as np
import pytest
from PIL import Image

from tests.helpers.cdp import chromium, chromium_path
from tests.helpers.serve_process import judge_reads, picture, server_process

PROMPT = "a yellow star above a blue circle, purple background"
KEY = "page-key"

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (.ci/run installs it)")


def test_the_page_draws_the_prompt_in_headless_chromium():
    with server_process(["--api-key", KEY]) as (url, _), chromium(chromium_path()) as browser:
        page = browser.open_loaded(url + "/")
        page.wait_for("document.body.dataset.ready === '1'", 30)  # the options came from /health
        assert page.evaluate("document.getElementById('width').value") == "64"
        page.type_into("#prompt", PROMPT)
        page.type_into("#seed", "5")
        page.type_into("#api_key", KEY)
        page.click("#generate")
        page.wait_for("document.getElementById('picture').complete && "
                      "document.getElementById('picture').naturalWidth === 64", 60)  # fmt: skip
        assert page.evaluate("document.getElementById('progress').value") == 4  # 4 LCM steps reported
        assert page.evaluate("document.getElementById('status').textContent").startswith("done: 64x64, seed 5")
        sent = picture(bytes(page.evaluate("fetch(document.getElementById('picture').src).then(r => r.arrayBuffer())"
                                           ".then(b => Array.from(new Uint8Array(b)))")))  # fmt: skip
        shot = picture(page.screenshot(selector="#picture"))
    assert shot.shape == (256, 256, 3), shot.shape  # shown 4x, unsmoothed
    shown = np.asarray(Image.fromarray(shot).resize((64, 64), Image.BOX))
    assert np.abs(shown.astype(int) - sent.astype(int)).max() <= 2, "the screenshot is not the picture sent"
    assert judge_reads(shown, PROMPT)["all"] == 1.0, "the judge does not read the prompt on the screen"
